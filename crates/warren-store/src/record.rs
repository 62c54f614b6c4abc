//! The record framing shared by segment files and the topology file:
//! length, CRC32C, kind, queue, sequence number, payload. See
//! docs/storage-format.md for every byte.

/// Bytes before a record's body: length (4) and checksum (4).
pub const FRAME_HEADER_BYTES: usize = 8;
/// Bytes of a record body before its payload: kind (1), queue (8), sequence (8).
pub const BODY_HEADER_BYTES: usize = 17;
/// The largest record body accepted when reading. Anything larger is taken
/// as a corrupt length field, not as a record to allocate for.
pub const RECORD_BODY_MAX_BYTES: usize = 600 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A persistent message entered a durable queue.
    Publish = 1,
    /// A message left its queue (acked, rejected, expired, purged).
    Remove = 2,
    /// A message was handed to a consumer (so it comes back redelivered).
    Delivered = 3,
    /// A transient message written only to free memory; ignored by recovery.
    Paged = 4,
    /// One entry of the topology snapshot, or one added by the topology
    /// journal.
    Topology = 5,
    /// An entry the topology journal removed.
    TopologyRemoved = 6,
    /// A persistent message that entered one or more durable queues,
    /// written once however many: `sequence` is the number of queues, and
    /// the payload starts with their ids (see [`split_routes`]).
    Message = 7,
    /// Messages that left their queues (acked, rejected, expired, purged):
    /// `sequence` entries of [`Mark`], each naming the queue and the
    /// message's record.
    Settled = 8,
    /// Messages that went to a consumer and came back, or were still with
    /// one when the broker stopped: after a clean restart they are marked
    /// redelivered. Entries as in `Settled`.
    Returned = 9,
    /// Written first after a start that followed a crash: every message
    /// of an older record may have been delivered before the crash, so it
    /// stays marked redelivered however the broker stops later.
    CrashRestart = 10,
    /// A message that compaction carried over into a segment's rewritten
    /// file: `queue` holds where its record was first written (see
    /// [`OriginalPlace`]), which stays its identity, `sequence` the number
    /// of queues still holding it, and the payload their ids, one flag
    /// byte per queue, then the message (see [`split_kept`]).
    Kept = 11,
}

impl RecordKind {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Publish,
            2 => Self::Remove,
            3 => Self::Delivered,
            4 => Self::Paged,
            5 => Self::Topology,
            6 => Self::TopologyRemoved,
            7 => Self::Message,
            8 => Self::Settled,
            9 => Self::Returned,
            10 => Self::CrashRestart,
            11 => Self::Kept,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: RecordKind,
    pub queue: u64,
    pub sequence: u64,
    pub payload: &'a [u8],
}

/// Appends one record to `out`; returns its encoded length.
pub fn encode(
    out: &mut Vec<u8>,
    kind: RecordKind,
    queue: u64,
    sequence: u64,
    payload: &[u8],
) -> usize {
    let start = out.len();
    encode_head(out, kind, queue, sequence, payload, &[]);
    out.len() - start
}

/// Appends one record whose payload is `head` followed by `tail`, leaving
/// the `tail` bytes out of `out`: the caller writes them right after,
/// from wherever they already are (a large message body is written from
/// the buffer it arrived in, never copied). The length and checksum cover
/// both parts. Returns the record's whole encoded length.
pub fn encode_head(
    out: &mut Vec<u8>,
    kind: RecordKind,
    queue: u64,
    sequence: u64,
    head: &[u8],
    tail: &[u8],
) -> usize {
    let start = out.len();
    let body_length = BODY_HEADER_BYTES + head.len() + tail.len();
    out.extend_from_slice(&(body_length as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind as u8);
    out.extend_from_slice(&queue.to_le_bytes());
    out.extend_from_slice(&sequence.to_le_bytes());
    out.extend_from_slice(head);
    let checksum = crc32c::crc32c_append(crc32c::crc32c(&out[start + FRAME_HEADER_BYTES..]), tail);
    out[start + 4..start + 8].copy_from_slice(&checksum.to_le_bytes());
    FRAME_HEADER_BYTES + body_length
}

pub fn encoded_length(payload_length: usize) -> usize {
    FRAME_HEADER_BYTES + BODY_HEADER_BYTES + payload_length
}

/// Bytes of one queue id in a `Message` record's payload.
pub const ROUTE_BYTES: usize = 8;

/// Appends the route prefix of a `Message` record's payload.
pub fn encode_routes(out: &mut Vec<u8>, queues: &[u64]) {
    for queue in queues {
        out.extend_from_slice(&queue.to_le_bytes());
    }
}

/// A `Message` record's queues and message payload; None when the payload
/// is shorter than `count` queue ids.
pub fn split_routes(count: u64, payload: &[u8]) -> Option<(impl Iterator<Item = u64> + '_, &[u8])> {
    let prefix = usize::try_from(count).ok()?.checked_mul(ROUTE_BYTES)?;
    if payload.len() < prefix {
        return None;
    }
    let (routes, message) = payload.split_at(prefix);
    let queues = routes
        .chunks_exact(ROUTE_BYTES)
        .map(|bytes| u64::from_le_bytes(bytes.try_into().expect("8 bytes")));
    Some((queues, message))
}

/// A `Kept` record's flag for a queue: the message went to a consumer of
/// it before, so it comes back redelivered.
pub const KEPT_RETURNED: u8 = 1;

/// Where a `Kept` record's message was first written in its segment, and
/// that record's length: the location queues and marks still know it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginalPlace {
    pub offset: u32,
    pub length: u32,
}

impl OriginalPlace {
    /// As a `Kept` record's `queue` field: the length in the high half.
    pub fn to_field(self) -> u64 {
        (u64::from(self.length) << 32) | u64::from(self.offset)
    }

    pub fn from_field(field: u64) -> Self {
        Self {
            offset: field as u32,
            length: (field >> 32) as u32,
        }
    }
}

/// Appends the prefix of a `Kept` record's payload: the queues, then their
/// flags.
pub fn encode_kept_routes(out: &mut Vec<u8>, routes: &[(u64, u8)]) {
    for (queue, _) in routes {
        out.extend_from_slice(&queue.to_le_bytes());
    }
    out.extend(routes.iter().map(|(_, flags)| *flags));
}

/// The queues a kept message is still in, each with its flags.
pub type KeptRoutes = Vec<(u64, u8)>;

/// A `Kept` record's queues with their flags, and the message; None when
/// the payload is shorter than `count` queues and flags.
pub fn split_kept(count: u64, payload: &[u8]) -> Option<(KeptRoutes, &[u8])> {
    let count = usize::try_from(count).ok()?;
    let prefix = count.checked_mul(ROUTE_BYTES + 1)?;
    if payload.len() < prefix {
        return None;
    }
    let (ids, rest) = payload.split_at(count * ROUTE_BYTES);
    let (flags, message) = rest.split_at(count);
    let routes = ids
        .chunks_exact(ROUTE_BYTES)
        .map(|bytes| u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
        .zip(flags.iter().copied())
        .collect();
    Some((routes, message))
}

/// One entry of a `Settled` or `Returned` record: a queue and where the
/// message's `Message` (or `Publish`) record starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub queue: u64,
    pub segment: u64,
    pub offset: u32,
}

/// Bytes of one `Mark`: queue (8), segment (4), offset (4).
pub const MARK_BYTES: usize = 16;

pub fn encode_mark(out: &mut Vec<u8>, mark: Mark) {
    out.extend_from_slice(&mark.queue.to_le_bytes());
    // A segment number past 2^32 would take 64 PiB of 16 MiB segments.
    out.extend_from_slice(&(mark.segment as u32).to_le_bytes());
    out.extend_from_slice(&mark.offset.to_le_bytes());
}

/// The marks of a `Settled` or `Returned` record's payload; None when its
/// length is not a whole number of marks.
pub fn decode_marks(payload: &[u8]) -> Option<impl Iterator<Item = Mark> + '_> {
    if !payload.len().is_multiple_of(MARK_BYTES) {
        return None;
    }
    Some(payload.chunks_exact(MARK_BYTES).map(|bytes| Mark {
        queue: u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes")),
        segment: u64::from(u32::from_le_bytes(
            bytes[8..12].try_into().expect("4 bytes"),
        )),
        offset: u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")),
    }))
}

/// What reading one record from a byte slice found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole, valid record and its encoded length.
    Record(Record<'a>, usize),
    /// The bytes end in the middle of a record: a torn write.
    Torn,
    /// A complete record whose checksum or contents are wrong; skip `usize`
    /// bytes to reach the next one.
    Corrupt(usize),
    /// A length field that cannot be right; nothing after it can be trusted.
    Garbage,
}

pub fn decode(bytes: &[u8]) -> Decoded<'_> {
    decode_checked(bytes, true)
}

/// As `decode`, without computing the checksum: for bytes already checked
/// (recovery's second pass over a segment its first pass read whole).
pub fn decode_trusted(bytes: &[u8]) -> Decoded<'_> {
    decode_checked(bytes, false)
}

fn decode_checked(bytes: &[u8], check: bool) -> Decoded<'_> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return Decoded::Torn;
    }
    let body_length = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    if !(BODY_HEADER_BYTES..=RECORD_BODY_MAX_BYTES).contains(&body_length) {
        return Decoded::Garbage;
    }
    let total = FRAME_HEADER_BYTES + body_length;
    if bytes.len() < total {
        return Decoded::Torn;
    }
    let checksum = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let body = &bytes[FRAME_HEADER_BYTES..total];
    if check && crc32c::crc32c(body) != checksum {
        return Decoded::Corrupt(total);
    }
    let Some(kind) = RecordKind::from_byte(body[0]) else {
        return Decoded::Corrupt(total);
    };
    Decoded::Record(
        Record {
            kind,
            queue: u64::from_le_bytes(body[1..9].try_into().expect("8 bytes")),
            sequence: u64::from_le_bytes(body[9..17].try_into().expect("8 bytes")),
            payload: &body[BODY_HEADER_BYTES..],
        },
        total,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut out = Vec::new();
        let length = encode(&mut out, RecordKind::Publish, 7, 42, b"hello");
        assert_eq!(length, encoded_length(5));
        let Decoded::Record(record, used) = decode(&out) else {
            panic!("expected a record")
        };
        assert_eq!(used, length);
        assert_eq!(record.kind, RecordKind::Publish);
        assert_eq!(
            (record.queue, record.sequence, record.payload),
            (7, 42, &b"hello"[..])
        );
    }

    #[test]
    fn a_record_written_in_two_parts_is_the_record_written_whole() {
        let mut whole = Vec::new();
        encode(&mut whole, RecordKind::Paged, 3, 9, b"head and tail");
        let mut parts = Vec::new();
        let length = encode_head(&mut parts, RecordKind::Paged, 3, 9, b"head ", b"and tail");
        parts.extend_from_slice(b"and tail");
        assert_eq!(length, whole.len());
        assert_eq!(parts, whole);
    }

    #[test]
    fn routes_and_marks_come_back_as_written() {
        let mut payload = Vec::new();
        encode_routes(&mut payload, &[3, 1 << 40]);
        payload.extend_from_slice(b"message");
        let (queues, message) = split_routes(2, &payload).expect("splits");
        assert_eq!(queues.collect::<Vec<_>>(), [3, 1 << 40]);
        assert_eq!(message, b"message");
        assert!(split_routes(3, &payload[..20]).is_none());
        let marks = [
            Mark {
                queue: 9,
                segment: 12,
                offset: 4096,
            },
            Mark {
                queue: 1,
                segment: 1,
                offset: 0,
            },
        ];
        let mut payload = Vec::new();
        for mark in marks {
            encode_mark(&mut payload, mark);
        }
        assert_eq!(payload.len(), 2 * MARK_BYTES);
        assert_eq!(
            decode_marks(&payload).expect("whole").collect::<Vec<_>>(),
            marks
        );
        assert!(decode_marks(&payload[..17]).is_none());
    }

    #[test]
    fn kept_routes_and_original_place_come_back_as_written() {
        let mut payload = Vec::new();
        encode_kept_routes(&mut payload, &[(3, 0), (1 << 40, KEPT_RETURNED)]);
        payload.extend_from_slice(b"message");
        let (routes, message) = split_kept(2, &payload).expect("splits");
        assert_eq!(routes, [(3, 0), (1 << 40, KEPT_RETURNED)]);
        assert_eq!(message, b"message");
        assert!(split_kept(2, &payload[..17]).is_none());
        let place = OriginalPlace {
            offset: u32::MAX - 1,
            length: 70_000,
        };
        assert_eq!(OriginalPlace::from_field(place.to_field()), place);
    }

    #[test]
    fn a_cut_record_is_torn_and_a_flipped_bit_is_corrupt() {
        let mut out = Vec::new();
        encode(&mut out, RecordKind::Remove, 1, 2, b"");
        assert_eq!(decode(&out[..out.len() - 1]), Decoded::Torn);
        out[12] ^= 1;
        assert_eq!(decode(&out), Decoded::Corrupt(out.len()));
        assert_eq!(
            decode(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]),
            Decoded::Garbage
        );
    }
}
