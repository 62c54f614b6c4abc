//! Compaction: gives back the disk space of dead records that a few
//! long-lived messages would otherwise keep.
//!
//! A segment file is deleted whole once nothing in it is needed (see
//! `log::collect_deletable`). Two things keep one that is mostly dead: a
//! message still in a queue, and a mark that settles a message of an older
//! segment still on disk (its "back reference"). Left alone, one old
//! unacknowledged message would keep its segment, the segments holding
//! marks for that segment's other messages, and so on down the log.
//!
//! Compaction rewrites such a segment into a new file of the same number
//! and a higher generation, `<number>.<generation>.seg`, that holds only
//! what is still needed:
//!
//! * each message some queue still holds, as a `Kept` record that keeps
//!   its first location as its identity (queues and marks know it by that),
//!   names only the queues still holding it, and carries their
//!   "redelivered" flags, so the marks that settled or returned it in later
//!   segments are no longer needed;
//! * the marks of the segment's own `Settled` and `Returned` records that
//!   name a message of another segment still on disk, and its
//!   `CrashRestart` record, in their original order.
//!
//! Its marks being folded in, the segment is no longer a back reference of
//! the segments that held them, which can go. The log rolls to a new
//! segment before it starts, and waits for what was appended before the
//! roll to be written, so every mark for the segment it rewrites is on disk
//! in a segment it reads, and none is added to those segments while it
//! runs. A read finds a kept message through a few anchors per segment
//! (see `log::CompactedFile`), and reads again if it raced with the file's
//! replacement.
//!
//! Compaction leaves alone a segment with version-1 records and one with
//! live `Paged` records (nothing on disk tells a live paged record from a
//! dead one). It never poisons the log: a failure leaves the old file,
//! which is still right, and is tried again later.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use crate::log::{
    ANCHOR_SPACING_BYTES, CompactedFile, SegmentState, Shared, State, StoreError,
    collect_deletable, delete_segments, segment_file,
};
use crate::record::{self, Decoded, KEPT_RETURNED, OriginalPlace, RecordKind};

/// What one pass of compaction did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompactionReport {
    pub segments_rewritten: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// The compaction thread: looks for mostly dead segments every `interval`
/// until the log shuts down.
pub(crate) fn compaction_loop(shared: &Shared, interval: Duration) {
    loop {
        {
            let mut state = shared.state.lock();
            if !state.shutting_down {
                shared.compaction_wake.wait_for(&mut state, interval);
            }
            if state.shutting_down {
                return;
            }
        }
        match compact_sparse_segments(shared) {
            Ok(report) if report.segments_rewritten > 0 => {
                tracing::debug!(?report, "compacted message log segments");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "compacting the message log failed; the segments stay as they were");
            }
        }
    }
}

/// Whether a segment is worth rewriting: at least half of its shares are
/// dead, and at least `min_dead_bytes` (see `LogConfig`); or it was
/// rewritten before, and marks it kept have been folded in elsewhere since.
pub(crate) fn worth_compacting(segment: &SegmentState, min_dead_bytes: u64) -> bool {
    if !segment.created || segment.keep_as_is || segment.compacting || segment.paged_live > 0 {
        return false;
    }
    if segment.stale_marks && segment.bytes >= min_dead_bytes.max(1) {
        return true;
    }
    if segment.shares == 0 {
        return false;
    }
    let dead_shares = segment.shares.saturating_sub(segment.live);
    let dead_bytes =
        (u128::from(segment.bytes) * u128::from(dead_shares) / u128::from(segment.shares)) as u64;
    dead_bytes >= min_dead_bytes.max(1) && dead_bytes * 2 >= segment.bytes
}

/// Rewrites every segment worth it, oldest first.
pub(crate) fn compact_sparse_segments(shared: &Shared) -> Result<CompactionReport, StoreError> {
    let mut report = CompactionReport::default();
    let min_dead_bytes = shared.config.compaction_min_dead_bytes;
    let boundary = {
        let mut state = shared.state.lock();
        let any = state.segments.iter().any(|(number, segment)| {
            *number != state.active_segment && worth_compacting(segment, min_dead_bytes)
        });
        if !any || state.poisoned.is_some() || state.shutting_down {
            return Ok(report);
        }
        // From here on marks go to segments that compaction does not read.
        if state.active_length > 0 {
            state.active_segment += 1;
            state.active_length = 0;
            let active = state.active_segment;
            state.segments.entry(active).or_default();
        }
        let boundary = state.active_segment;
        let appended = state.last_ticket;
        while state.durable_ticket < appended {
            if let Some(reason) = &state.poisoned {
                return Err(StoreError::Poisoned(reason.clone()));
            }
            if state.shutting_down {
                return Ok(report);
            }
            shared
                .written
                .wait_for(&mut state, Duration::from_millis(100));
        }
        boundary
    };
    let mut tried: BTreeSet<u64> = BTreeSet::new();
    while let Some(job) = next_job(shared, boundary, &tried) {
        tried.insert(job.segment);
        let before = job.bytes;
        let rewritten = rewrite(shared, &job);
        let after = finish(shared, &job, rewritten)?;
        if let Some(after) = after {
            report.segments_rewritten += 1;
            report.bytes_before += before;
            report.bytes_after += after;
        }
    }
    Ok(report)
}

/// One segment to rewrite, and what its rewriting needs to know, taken
/// under the log's lock.
struct Job {
    segment: u64,
    generation: u32,
    bytes: u64,
    boundary: u64,
    /// Newer segments holding marks for this one: (number, generation).
    markers: Vec<(u64, u32)>,
    /// The other segments on disk, each with the boundary of its last
    /// compaction (0 if none): a mark this segment holds for one of them is
    /// kept unless that segment is gone or has folded the mark in.
    others: BTreeMap<u64, u64>,
    deleted_queues: HashSet<u64>,
}

fn next_job(shared: &Shared, boundary: u64, tried: &BTreeSet<u64>) -> Option<Job> {
    let mut state = shared.state.lock();
    if state.poisoned.is_some() || state.shutting_down {
        return None;
    }
    let segment = state
        .segments
        .range(..boundary)
        .find(|(number, segment)| {
            !tried.contains(number)
                && worth_compacting(segment, shared.config.compaction_min_dead_bytes)
        })
        .map(|(number, _)| *number)?;
    let markers = state
        .segments
        .range(segment + 1..boundary)
        .filter(|(_, other)| other.back_references.contains(&segment))
        .map(|(number, other)| (*number, other.generation()))
        .collect();
    let others = state
        .segments
        .iter()
        .filter(|(number, _)| **number != segment)
        .map(|(number, other)| {
            (
                *number,
                other.compacted.as_ref().map_or(0, |file| file.boundary),
            )
        })
        .collect();
    let deleted_queues = state.deleted_queues.keys().copied().collect();
    let info = state.segments.get_mut(&segment).expect("found above");
    info.compacting = true;
    Some(Job {
        segment,
        generation: info.generation(),
        bytes: info.bytes,
        boundary,
        markers,
        others,
        deleted_queues,
    })
}

/// A segment's new file, written and synced under its final name.
struct Rewritten {
    generation: u32,
    bytes: u64,
    anchors: Vec<(u32, u32)>,
    /// Older segments whose messages the kept marks name.
    back_references: BTreeSet<u64>,
    /// Queues' shares of the kept messages.
    kept_shares: u64,
}

/// What the segments holding marks for the one being rewritten say of it.
#[derive(Default)]
struct Folded {
    settled: HashSet<(u64, u32)>,
    returned: HashSet<(u64, u32)>,
    /// A newer segment holds a CrashRestart record: every message of this
    /// one may have been delivered before that crash.
    crashed_after: bool,
}

fn rewrite(shared: &Shared, job: &Job) -> Result<Option<Rewritten>, StoreError> {
    let mut folded = Folded::default();
    let mut bytes = Vec::new();
    for &(number, generation) in &job.markers {
        let path = shared.dir.join(segment_file(number, generation));
        shared
            .fs
            .read_all_into(&path, &mut bytes)
            .map_err(|error| StoreError::io("reading", &path, error))?;
        gather_marks(&bytes, job.segment, Crashes::Count, &mut folded);
    }
    let path = shared.dir.join(segment_file(job.segment, job.generation));
    shared
        .fs
        .read_all_into(&path, &mut bytes)
        .map_err(|error| StoreError::io("reading", &path, error))?;
    // Its own CrashRestart record is copied where it is, and still tells
    // recovery which messages came before it.
    gather_marks(&bytes, job.segment, Crashes::Ignore, &mut folded);
    let Some(content) = rewritten_content(&bytes, job, &folded) else {
        return Ok(None);
    };
    let generation = job.generation + 1;
    let final_path = shared.dir.join(segment_file(job.segment, generation));
    let temporary = final_path.with_extension(COMPACTING_EXTENSION);
    let written = (|| {
        shared
            .fs
            .write(&temporary, &content.bytes)
            .map_err(|error| StoreError::io("writing", &temporary, error))?;
        shared
            .fs
            .sync(&temporary)
            .map_err(|error| StoreError::io("fsync of", &temporary, error))?;
        shared
            .fs
            .rename(&temporary, &final_path)
            .map_err(|error| StoreError::io("renaming", &temporary, error))?;
        shared
            .fs
            .sync_dir(&shared.dir)
            .map_err(|error| StoreError::io("fsync of", &shared.dir, error))
    })();
    if let Err(error) = written {
        let _ = shared.fs.remove(&temporary);
        return Err(error);
    }
    Ok(Some(Rewritten {
        generation,
        bytes: content.bytes.len() as u64,
        anchors: content.anchors,
        back_references: content.back_references,
        kept_shares: content.kept_shares,
    }))
}

/// A rewritten file's name while it is written; recovery deletes any it
/// finds.
pub(crate) const COMPACTING_EXTENSION: &str = "compacting";

/// Whether a CrashRestart record among the marks read counts for every
/// message of the segment being rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Crashes {
    Count,
    Ignore,
}

/// Collects the marks in `bytes` (a segment's file) for messages of
/// `segment`. A record that does not decode is passed over: a mark lost
/// that way only keeps its message, as recovery would.
fn gather_marks(bytes: &[u8], segment: u64, crashes: Crashes, folded: &mut Folded) {
    let mut offset = 0;
    while offset < bytes.len() {
        match record::decode(&bytes[offset..]) {
            Decoded::Record(found, length) => {
                match found.kind {
                    RecordKind::Settled | RecordKind::Returned => {
                        let marks = record::decode_marks(found.payload).into_iter().flatten();
                        for mark in marks.filter(|mark| mark.segment == segment) {
                            let share = (mark.queue, mark.offset);
                            if found.kind == RecordKind::Settled {
                                folded.settled.insert(share);
                            } else {
                                folded.returned.insert(share);
                            }
                        }
                    }
                    RecordKind::CrashRestart if crashes == Crashes::Count => {
                        folded.crashed_after = true;
                    }
                    _ => {}
                }
                offset += length;
            }
            Decoded::Corrupt(length) => offset += length,
            Decoded::Torn | Decoded::Garbage => break,
        }
    }
}

struct Content {
    bytes: Vec<u8>,
    anchors: Vec<(u32, u32)>,
    back_references: BTreeSet<u64>,
    kept_shares: u64,
}

/// The records of `bytes` (the segment's current file) that are still
/// needed; None when the file holds something compaction does not
/// rewrite (a damaged record, a version-1 record).
fn rewritten_content(bytes: &[u8], job: &Job, folded: &Folded) -> Option<Content> {
    let mut content = Content {
        bytes: Vec::new(),
        anchors: Vec::new(),
        back_references: BTreeSet::new(),
        kept_shares: 0,
    };
    let mut offset = 0;
    while offset < bytes.len() {
        let Decoded::Record(found, length) = record::decode(&bytes[offset..]) else {
            return None;
        };
        let at = u32::try_from(offset).ok()?;
        match found.kind {
            RecordKind::Message => {
                let (routes, message) = record::split_routes(found.sequence, found.payload)?;
                let place = OriginalPlace {
                    offset: at,
                    length: length as u32,
                };
                let routes: Vec<(u64, u8)> = routes.map(|queue| (queue, 0)).collect();
                keep_message(&mut content, job, folded, place, &routes, message)?;
            }
            RecordKind::Kept => {
                let (routes, message) = record::split_kept(found.sequence, found.payload)?;
                let place = OriginalPlace::from_field(found.queue);
                keep_message(&mut content, job, folded, place, &routes, message)?;
            }
            RecordKind::Settled | RecordKind::Returned => {
                let still_needed: Vec<record::Mark> = record::decode_marks(found.payload)?
                    .filter(|mark| {
                        mark.segment != job.segment
                            && job
                                .others
                                .get(&mark.segment)
                                .is_some_and(|folded_before| job.segment >= *folded_before)
                    })
                    .collect();
                if !still_needed.is_empty() {
                    let mut payload = Vec::with_capacity(still_needed.len() * record::MARK_BYTES);
                    for mark in &still_needed {
                        record::encode_mark(&mut payload, *mark);
                        if mark.segment < job.segment {
                            content.back_references.insert(mark.segment);
                        }
                    }
                    record::encode(
                        &mut content.bytes,
                        found.kind,
                        0,
                        still_needed.len() as u64,
                        &payload,
                    );
                }
            }
            RecordKind::CrashRestart => {
                content
                    .bytes
                    .extend_from_slice(&bytes[offset..offset + length]);
                content
                    .back_references
                    .extend(job.others.keys().filter(|number| **number < job.segment));
            }
            // Every paged record of the segment is dead (see
            // `worth_compacting`).
            RecordKind::Paged => {}
            RecordKind::Publish
            | RecordKind::Remove
            | RecordKind::Delivered
            | RecordKind::Topology
            | RecordKind::TopologyRemoved => return None,
        }
        offset += length;
    }
    Some(content)
}

/// Writes a message as a `Kept` record naming the queues that still hold
/// it, unless none does.
fn keep_message(
    content: &mut Content,
    job: &Job,
    folded: &Folded,
    place: OriginalPlace,
    routes: &[(u64, u8)],
    message: &[u8],
) -> Option<()> {
    let kept: Vec<(u64, u8)> = routes
        .iter()
        .filter(|(queue, _)| {
            !folded.settled.contains(&(*queue, place.offset)) && !job.deleted_queues.contains(queue)
        })
        .map(|&(queue, flags)| {
            let returned = folded.crashed_after || folded.returned.contains(&(queue, place.offset));
            (
                queue,
                if returned {
                    flags | KEPT_RETURNED
                } else {
                    flags
                },
            )
        })
        .collect();
    if kept.is_empty() {
        return Some(());
    }
    content.kept_shares += kept.len() as u64;
    let moved_to = u32::try_from(content.bytes.len()).ok()?;
    let anchored = content.anchors.last().map_or(0, |(_, anchor)| *anchor);
    if content.anchors.is_empty() || moved_to - anchored >= ANCHOR_SPACING_BYTES {
        content.anchors.push((place.offset, moved_to));
    }
    let mut head = Vec::with_capacity(kept.len() * (record::ROUTE_BYTES + 1));
    record::encode_kept_routes(&mut head, &kept);
    record::encode_head(
        &mut content.bytes,
        RecordKind::Kept,
        place.to_field(),
        kept.len() as u64,
        &head,
        message,
    );
    content.bytes.extend_from_slice(message);
    Some(())
}

/// Puts a rewritten file in its segment's place, or gives up on it;
/// returns the new file's length when one was installed.
fn finish(
    shared: &Shared,
    job: &Job,
    rewritten: Result<Option<Rewritten>, StoreError>,
) -> Result<Option<u64>, StoreError> {
    let mut state = shared.state.lock();
    let segment = state
        .segments
        .get_mut(&job.segment)
        .expect("a segment being compacted is not deleted");
    segment.compacting = false;
    let stale_marks = std::mem::take(&mut segment.stale_marks);
    let rewritten = match rewritten {
        Ok(Some(rewritten)) => rewritten,
        Ok(None) => {
            // Not rewritable: never tried again while it stays as it is.
            segment.keep_as_is = true;
            return Ok(None);
        }
        Err(error) => {
            segment.stale_marks = stale_marks;
            return Err(error);
        }
    };
    segment.compacted = Some(CompactedFile {
        generation: rewritten.generation,
        anchors: rewritten.anchors,
        boundary: job.boundary,
    });
    // Shares settled while it ran were kept, their marks not on disk yet:
    // counted dead, they make the segment worth rewriting again once those
    // marks are written. A rewrite that gained nothing counts only what
    // dies from now on, so a share no mark will ever settle cannot make
    // compaction rewrite the same file over and over.
    segment.shares = if rewritten.bytes < job.bytes {
        rewritten.kept_shares.max(segment.live)
    } else {
        segment.live
    };
    segment.bytes = rewritten.bytes;
    segment.back_references = rewritten.back_references;
    for (number, _) in &job.markers {
        if let Some(marker) = state.segments.get_mut(number) {
            marker.back_references.remove(&job.segment);
            // A rewritten marker kept its marks for this segment: they
            // are dead weight now.
            marker.stale_marks |= marker.compacted.is_some();
        }
    }
    let mut doomed = collect_deletable(&mut state);
    prune_deleted_queues(&mut state);
    drop(state);
    doomed.push((job.segment, job.generation));
    delete_segments(shared, &doomed);
    Ok(Some(rewritten.bytes))
}

/// Forgets deleted queues older than every segment: no record names them
/// any more.
fn prune_deleted_queues(state: &mut State) {
    let Some(oldest) = state.segments.keys().next().copied() else {
        return;
    };
    state
        .deleted_queues
        .retain(|_, deleted_in| *deleted_in >= oldest);
}
