//! Recovery of the message log: which messages are still in which queue.
//!
//! The log is read twice. The first pass reads only what settles or marks
//! messages (Settled, Returned, CrashRestart and the version-1 Remove and
//! Delivered records), checks every record's checksum and truncates a torn
//! tail; the second hands each message that is still in a queue to the
//! caller as it meets it, with its payload. Nothing per live message is
//! kept in between, so recovering a backlog of ten million messages costs
//! the memory of the marks still in the log (a few per settled message
//! whose record survives), not of the backlog: the queues keep what they
//! receive in their own spilling backlogs.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use crate::compact::COMPACTING_EXTENSION;
use crate::fs::FileSystem;
use crate::log::{
    ANCHOR_SPACING_BYTES, CompactedFile, Location, RecoveredMessage, Recovery, SegmentState,
    StoreError, parse_segment_file, segment_file,
};
use crate::record::{self, Decoded, KEPT_RETURNED, OriginalPlace, RecordKind};

/// Told each message still in a queue, in log order: its queue, what
/// recovery knows of it, and its payload (the message as stored). Returns
/// whether the queue still exists; a message of a deleted queue is not
/// counted as live, so its segment can go.
pub type RecoveredSink<'a> = dyn FnMut(u64, RecoveredMessage, &[u8]) -> bool + 'a;

/// A message's identity in a queue: its queue and where its record starts.
type Share = (u64, u64, u32);

/// What the first pass learns: the marks, each with the segment that holds
/// it, which must outlive the segment of the message it names.
#[derive(Default)]
struct Marks {
    settled: HashMap<Share, u64>,
    returned: HashMap<Share, u64>,
    /// Version 1: by queue and sequence.
    removed_v1: HashMap<(u64, u64), u64>,
    delivered_v1: HashMap<(u64, u64), u64>,
    /// Where the last CrashRestart record is: every message before it may
    /// have been delivered.
    crash_restart: Option<(u64, u32)>,
    /// Records whose checksum failed, which the second pass, not checking
    /// checksums again, must skip too.
    corrupt: HashSet<(u64, u32)>,
    /// Where the first pass stopped reading a segment (torn or unreadable
    /// bytes), when that is before its end.
    ends: HashMap<u64, usize>,
}

pub(crate) struct Replayed {
    pub segments: BTreeMap<u64, SegmentState>,
    pub recovery: Recovery,
    pub newest: u64,
    /// Queues that hold messages in the log but are gone from the topology.
    pub deleted_queues: BTreeSet<u64>,
}

/// A segment to read: its number and the generation of its file.
type SegmentFile = (u64, u32);

/// Replays every segment of `dir`. A record cut short at the end of the
/// newest segment is a write torn by a crash and is truncated away; a
/// record whose checksum fails is skipped and logged; neither stops
/// recovery. After an unclean shutdown every message comes back delivered.
pub(crate) fn replay(
    fs: &dyn FileSystem,
    dir: &Path,
    clean_shutdown: bool,
    sink: &mut RecoveredSink<'_>,
) -> Result<Replayed, StoreError> {
    let numbers = segment_files(fs, dir)?;
    let mut recovery = Recovery {
        clean_shutdown,
        ..Recovery::default()
    };
    let mut segments: BTreeMap<u64, SegmentState> = BTreeMap::new();
    let marks = read_marks(fs, dir, &numbers, &mut recovery, &mut segments)?;
    let deleted_queues = hand_over_messages(
        fs,
        dir,
        &numbers,
        marks,
        clean_shutdown,
        &mut segments,
        sink,
    )?;
    Ok(Replayed {
        segments,
        recovery,
        newest: numbers.last().map_or(0, |(number, _)| *number),
        deleted_queues,
    })
}

/// The segment files of `dir`, oldest first, each in its newest
/// generation. Older generations and unfinished rewrites are what a crash
/// during compaction leaves: the newest generation was synced before the
/// older one was deleted, so they go.
fn segment_files(fs: &dyn FileSystem, dir: &Path) -> Result<Vec<SegmentFile>, StoreError> {
    let names = fs
        .list(dir)
        .map_err(|error| StoreError::io("listing", dir, error))?;
    let mut newest: BTreeMap<u64, u32> = BTreeMap::new();
    let mut stale = Vec::new();
    for name in &names {
        if name.ends_with(&format!(".{COMPACTING_EXTENSION}")) {
            stale.push(name.clone());
        } else if let Some((number, generation)) = parse_segment_file(name) {
            let kept = newest.entry(number).or_insert(generation);
            if *kept != generation {
                let older = (*kept).min(generation);
                stale.push(segment_file(number, older));
                *kept = (*kept).max(generation);
            }
        }
    }
    for name in stale {
        let path = dir.join(&name);
        tracing::info!(path = %path.display(), "removing a file an interrupted compaction left");
        fs.remove(&path)
            .map_err(|error| StoreError::io("removing", &path, error))?;
    }
    Ok(newest.into_iter().collect())
}

/// The first pass: checks every record, truncates a torn tail, and
/// gathers the marks.
fn read_marks(
    fs: &dyn FileSystem,
    dir: &Path,
    numbers: &[SegmentFile],
    recovery: &mut Recovery,
    segments: &mut BTreeMap<u64, SegmentState>,
) -> Result<Marks, StoreError> {
    let mut marks = Marks::default();
    let newest = numbers.last().map(|(number, _)| *number);
    let mut bytes = Vec::new();
    for &(number, generation) in numbers {
        let path = dir.join(segment_file(number, generation));
        fs.read_all_into(&path, &mut bytes)
            .map_err(|error| StoreError::io("reading", &path, error))?;
        recovery.segments_read += 1;
        recovery.bytes_read += bytes.len() as u64;
        let segment_state = segments.entry(number).or_default();
        segment_state.created = true;
        segment_state.bytes = bytes.len() as u64;
        if generation > 0 {
            segment_state.compacted = Some(CompactedFile {
                generation,
                anchors: Vec::new(),
                // Marks folded in before a restart match no kept share,
                // so nothing refers back to this segment for them.
                boundary: 0,
            });
        }
        let mut offset = 0usize;
        while offset < bytes.len() {
            let Ok(record_offset) = u32::try_from(offset) else {
                tracing::error!(path = %path.display(), "a segment larger than 4 GiB was not written by Warren; reading stops here");
                break;
            };
            match record::decode(&bytes[offset..]) {
                Decoded::Record(record, length) => {
                    match record.kind {
                        RecordKind::Settled | RecordKind::Returned => {
                            let Some(found) = record::decode_marks(record.payload) else {
                                tracing::error!(path = %path.display(), offset,
                                    "skipping a settled or returned record of a wrong length");
                                recovery.corrupt_records_skipped += 1;
                                offset += length;
                                continue;
                            };
                            for mark in found {
                                let share = (mark.queue, mark.segment, mark.offset);
                                if record.kind == RecordKind::Settled {
                                    marks.settled.insert(share, number);
                                } else {
                                    marks.returned.insert(share, number);
                                }
                            }
                        }
                        RecordKind::Remove => {
                            marks
                                .removed_v1
                                .insert((record.queue, record.sequence), number);
                        }
                        RecordKind::Delivered => {
                            marks
                                .delivered_v1
                                .insert((record.queue, record.sequence), number);
                        }
                        RecordKind::CrashRestart => {
                            marks.crash_restart = Some((number, record_offset));
                            // It must outlive every older segment, across
                            // restarts as it did when written.
                            segment_state.back_references.extend(
                                numbers
                                    .iter()
                                    .map(|(older, _)| *older)
                                    .filter(|older| *older < number),
                            );
                        }
                        RecordKind::Kept => {
                            if let Some(file) = &mut segment_state.compacted {
                                let anchored = file.anchors.last().map_or(0, |(_, at)| *at);
                                if file.anchors.is_empty()
                                    || record_offset - anchored >= ANCHOR_SPACING_BYTES
                                {
                                    let original = OriginalPlace::from_field(record.queue);
                                    file.anchors.push((original.offset, record_offset));
                                }
                            }
                        }
                        RecordKind::Message
                        | RecordKind::Publish
                        | RecordKind::Paged
                        | RecordKind::Topology
                        | RecordKind::TopologyRemoved => {}
                    }
                    segment_state.keep_as_is |= matches!(
                        record.kind,
                        RecordKind::Publish | RecordKind::Remove | RecordKind::Delivered
                    );
                    offset += length;
                }
                Decoded::Corrupt(length) => {
                    tracing::error!(path = %path.display(), offset, "skipping a record whose checksum does not match");
                    recovery.corrupt_records_skipped += 1;
                    segment_state.keep_as_is = true;
                    marks.corrupt.insert((number, record_offset));
                    offset += length;
                }
                Decoded::Torn | Decoded::Garbage => {
                    marks.ends.insert(number, offset);
                    let dropped = bytes.len() - offset;
                    if Some(number) == newest {
                        tracing::warn!(path = %path.display(), offset, dropped_bytes = dropped,
                            "dropping a torn record at the end of the log");
                        fs.truncate(&path, offset as u64)
                            .map_err(|error| StoreError::io("truncating", &path, error))?;
                        segment_state.bytes = offset as u64;
                    } else {
                        // Compaction would lose what follows.
                        segment_state.keep_as_is = true;
                        tracing::error!(path = %path.display(), offset, dropped_bytes = dropped,
                            "unreadable bytes in the middle of the log; skipping the rest of the segment");
                    }
                    recovery.torn_records_dropped += 1;
                    break;
                }
            }
        }
    }
    Ok(marks)
}

/// The second pass: hands each message still in a queue to `sink`, and
/// counts it live in its segment.
fn hand_over_messages(
    fs: &dyn FileSystem,
    dir: &Path,
    numbers: &[SegmentFile],
    mut marks: Marks,
    clean_shutdown: bool,
    segments: &mut BTreeMap<u64, SegmentState>,
    sink: &mut RecoveredSink<'_>,
) -> Result<BTreeSet<u64>, StoreError> {
    // Per queue, the sequence number its last message had: a Message
    // record's messages are numbered on from there.
    let mut last_sequence: HashMap<u64, u64> = HashMap::new();
    let mut deleted_queues = BTreeSet::new();
    let mut bytes = Vec::new();
    for &(number, generation) in numbers {
        let path = dir.join(segment_file(number, generation));
        fs.read_all_into(&path, &mut bytes)
            .map_err(|error| StoreError::io("reading", &path, error))?;
        let end = marks
            .ends
            .get(&number)
            .map_or(bytes.len(), |&end| end.min(bytes.len()));
        let mut offset = 0usize;
        while offset < end {
            let Ok(record_offset) = u32::try_from(offset) else {
                break;
            };
            // The first pass checked every checksum, and reported what
            // failed.
            let (record, length) = match record::decode_trusted(&bytes[offset..end]) {
                Decoded::Record(_, length) if marks.corrupt.contains(&(number, record_offset)) => {
                    offset += length;
                    continue;
                }
                Decoded::Record(record, length) => (record, length),
                Decoded::Corrupt(length) => {
                    offset += length;
                    continue;
                }
                Decoded::Torn | Decoded::Garbage => break,
            };
            offset += length;
            let location = Location {
                segment: number,
                offset: record_offset,
                length: length as u32,
            };
            // After a crash, or before a CrashRestart record, a message
            // may have been delivered.
            let maybe_delivered = !clean_shutdown
                || marks
                    .crash_restart
                    .is_some_and(|position| (number, record_offset) < position);
            let mut hand_over =
                |segments: &mut BTreeMap<u64, SegmentState>, queue, message, payload: &[u8]| {
                    let segment = segments.entry(number).or_default();
                    segment.shares += 1;
                    if sink(queue, message, payload) {
                        segment.live += 1;
                    } else {
                        deleted_queues.insert(queue);
                    }
                };
            match record.kind {
                RecordKind::Publish => {
                    let key = (record.queue, record.sequence);
                    let last = last_sequence.entry(record.queue).or_default();
                    *last = (*last).max(record.sequence);
                    if let Some(removed_in) = marks.removed_v1.remove(&key) {
                        refer_back(segments, removed_in, number);
                        continue;
                    }
                    let delivered_in = marks.delivered_v1.get(&key).copied();
                    if let Some(delivered_in) = delivered_in {
                        refer_back(segments, delivered_in, number);
                    }
                    let message = RecoveredMessage {
                        sequence: record.sequence,
                        location,
                        delivered: maybe_delivered || delivered_in.is_some(),
                    };
                    hand_over(segments, record.queue, message, record.payload);
                }
                RecordKind::Message | RecordKind::Kept => {
                    let split: Option<(record::KeptRoutes, &[u8])> = if record.kind
                        == RecordKind::Message
                    {
                        record::split_routes(record.sequence, record.payload).map(
                            |(routes, payload)| (routes.map(|queue| (queue, 0)).collect(), payload),
                        )
                    } else {
                        record::split_kept(record.sequence, record.payload)
                    };
                    let Some((routes, payload)) = split else {
                        tracing::error!(path = %path.display(), offset = record_offset,
                            "skipping a message record shorter than its routes");
                        continue;
                    };
                    // A kept message is known by where it was first written.
                    let location = if record.kind == RecordKind::Kept {
                        let original = OriginalPlace::from_field(record.queue);
                        Location {
                            segment: number,
                            offset: original.offset,
                            length: original.length,
                        }
                    } else {
                        location
                    };
                    for (queue, flags) in routes {
                        let last = last_sequence.entry(queue).or_default();
                        *last += 1;
                        let share = (queue, number, location.offset);
                        if let Some(settled_in) = marks.settled.remove(&share) {
                            refer_back(segments, settled_in, number);
                            continue;
                        }
                        let returned_in = marks.returned.get(&share).copied();
                        if let Some(returned_in) = returned_in {
                            refer_back(segments, returned_in, number);
                        }
                        let message = RecoveredMessage {
                            sequence: *last,
                            location,
                            delivered: maybe_delivered
                                || returned_in.is_some()
                                || flags & KEPT_RETURNED != 0,
                        };
                        hand_over(segments, queue, message, payload);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(deleted_queues)
}

/// A mark in segment `marked_in` settles a message of segment `published_in`:
/// the mark must not be deleted before the message's segment, or the
/// message would come back as if never settled.
fn refer_back(segments: &mut BTreeMap<u64, SegmentState>, marked_in: u64, published_in: u64) {
    if marked_in > published_in {
        segments
            .entry(marked_in)
            .or_default()
            .back_references
            .insert(published_in);
    }
}
