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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use crate::fs::FileSystem;
use crate::log::{
    Location, RecoveredMessage, Recovery, SEGMENT_SUFFIX, SegmentState, StoreError, segment_name,
};
use crate::record::{self, Decoded, RecordKind};

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
}

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
    let mut numbers: Vec<u64> = fs
        .list(dir)
        .map_err(|error| StoreError::io("listing", dir, error))?
        .iter()
        .filter_map(|name| name.strip_suffix(SEGMENT_SUFFIX)?.parse().ok())
        .collect();
    numbers.sort_unstable();
    let mut recovery = Recovery {
        clean_shutdown,
        ..Recovery::default()
    };
    let mut segments: BTreeMap<u64, SegmentState> = BTreeMap::new();
    let marks = read_marks(fs, dir, &numbers, &mut recovery, &mut segments)?;
    hand_over_messages(
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
        newest: numbers.last().copied().unwrap_or(0),
    })
}

/// The first pass: checks every record, truncates a torn tail, and
/// gathers the marks.
fn read_marks(
    fs: &dyn FileSystem,
    dir: &Path,
    numbers: &[u64],
    recovery: &mut Recovery,
    segments: &mut BTreeMap<u64, SegmentState>,
) -> Result<Marks, StoreError> {
    let mut marks = Marks::default();
    let newest = numbers.last().copied();
    let mut bytes = Vec::new();
    for &number in numbers {
        let path = dir.join(segment_name(number));
        fs.read_all_into(&path, &mut bytes)
            .map_err(|error| StoreError::io("reading", &path, error))?;
        recovery.segments_read += 1;
        recovery.bytes_read += bytes.len() as u64;
        let segment_state = segments.entry(number).or_default();
        segment_state.created = true;
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
                            segment_state
                                .back_references
                                .extend(numbers.iter().copied().filter(|older| *older < number));
                        }
                        RecordKind::Message
                        | RecordKind::Publish
                        | RecordKind::Paged
                        | RecordKind::Topology
                        | RecordKind::TopologyRemoved => {}
                    }
                    offset += length;
                }
                Decoded::Corrupt(length) => {
                    tracing::error!(path = %path.display(), offset, "skipping a record whose checksum does not match");
                    recovery.corrupt_records_skipped += 1;
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
                    } else {
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
    numbers: &[u64],
    mut marks: Marks,
    clean_shutdown: bool,
    segments: &mut BTreeMap<u64, SegmentState>,
    sink: &mut RecoveredSink<'_>,
) -> Result<(), StoreError> {
    // Per queue, the sequence number its last message had: a Message
    // record's messages are numbered on from there.
    let mut last_sequence: HashMap<u64, u64> = HashMap::new();
    let mut bytes = Vec::new();
    for &number in numbers {
        let path = dir.join(segment_name(number));
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
                    if sink(record.queue, message, record.payload) {
                        segments.entry(number).or_default().live += 1;
                    }
                }
                RecordKind::Message => {
                    let Some((routes, payload)) =
                        record::split_routes(record.sequence, record.payload)
                    else {
                        tracing::error!(path = %path.display(), offset = record_offset,
                            "skipping a message record shorter than its routes");
                        continue;
                    };
                    for queue in routes {
                        let last = last_sequence.entry(queue).or_default();
                        *last += 1;
                        let share = (queue, number, record_offset);
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
                            delivered: maybe_delivered || returned_in.is_some(),
                        };
                        if sink(queue, message, payload) {
                            segments.entry(number).or_default().live += 1;
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
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
