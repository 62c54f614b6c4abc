//! Limits on field tables, checked before `amq-protocol` parses a frame.
//!
//! `amq-protocol` parses field tables recursively: each nested table (`F`)
//! or array (`A`) costs the parser one to two KiB of stack in a release build
//! (a 2 MiB stack, a tokio worker's, overflows between 1,000 and 2,000
//! levels) but costs the sender only five to seven bytes, so one 128 KiB
//! frame can nest some twenty thousand levels and abort the broker. This
//! module walks the field tables of a frame payload with an explicit,
//! fixed-size stack before the parser sees them, and refuses a table nested
//! deeper than a limit and a message `headers` table larger than a limit.
//!
//! The walk checks structure only: it allocates nothing and decodes no
//! value. It follows the rules of `amq-protocol-types`' parser (value types,
//! their widths, UTF-8 keys, every container ending exactly where its length
//! says), so that a table it accepts is one the parser accepts and a table it
//! calls malformed is one the parser refuses; the `field_table` fuzz target
//! checks that agreement. It must also find the tables exactly where the
//! parser will look for them, which is why the method layouts below copy
//! `amq-protocol`'s generated parsers field for field.

use std::str;

/// How deep a field table may nest by default. The table itself is depth 1
/// and each table or array inside it adds one. Real clients need at most 4:
/// the `x-death` header that dead-lettering adds is an array of tables that
/// hold arrays (headers, x-death, one death, its routing-keys), and
/// connection.start-ok's `capabilities` is depth 2. Sixteen leaves room for
/// applications' own nested headers while keeping the parser's recursion
/// under 32 KiB of stack (measured in a release build), a sixty-fourth of a
/// tokio worker's 2 MiB.
pub const TABLE_DEPTH_MAX_DEFAULT: u32 = 16;

/// The largest depth limit the scanner supports. Its stack of open
/// containers is a fixed array so that a scan never allocates. Sixty-four
/// levels is sixteen times what any known client sends, and the parser
/// needs under 128 KiB of stack for them.
pub const TABLE_DEPTH_CEILING: u32 = 64;

/// How many bytes of encoded entries a message's `headers` table may hold by
/// default. RabbitMQ bounds headers only by frame_max, because a content
/// header must fit in one frame; but operators raise frame_max to move large
/// bodies in fewer frames, and headers should not grow with it. Every byte of
/// a headers table becomes a decoded map that a headers exchange walks on
/// every publish and that is re-encoded on every delivery. Real clients send
/// a few hundred bytes (Celery's task headers, among the largest in common
/// use, stay within a couple of kilobytes), so 64 KiB, half of the default
/// frame_max of 128 KiB, refuses only abuse.
pub const HEADERS_SIZE_MAX_BYTES_DEFAULT: u32 = 64 * 1024;

/// The size of the length word in front of every field table, array, long
/// string and byte array.
const LENGTH_WORD_BYTES: usize = 4;

/// Content header: class-id (2), weight (2), body-size (8).
const CONTENT_HEADER_FIXED_BYTES: usize = 2 + 2 + 8;
const PROPERTY_CONTENT_TYPE: u16 = 1 << 15;
const PROPERTY_CONTENT_ENCODING: u16 = 1 << 14;
const PROPERTY_HEADERS: u16 = 1 << 13;
/// Bit 0 of a property flags word says that another flags word follows.
const PROPERTY_FLAGS_CONTINUED: u16 = 1;

/// The limits a [`FrameDecoder`](crate::FrameDecoder) enforces on the field
/// tables of the frames it decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableLimits {
    depth_max: u32,
    headers_size_max_bytes: u32,
}

impl TableLimits {
    /// `depth_max` counts a top-level table as depth 1;
    /// `headers_size_max_bytes` bounds the encoded entries of a content
    /// header's `headers` table (its length word, which excludes the word
    /// itself).
    ///
    /// # Panics
    ///
    /// When `depth_max` is 0 (no frame carrying a table could be decoded,
    /// not even connection.start-ok) or above [`TABLE_DEPTH_CEILING`]. Both
    /// are configuration mistakes that the configuration should refuse
    /// before it gets here.
    pub const fn new(depth_max: u32, headers_size_max_bytes: u32) -> Self {
        assert!(
            depth_max >= 1 && depth_max <= TABLE_DEPTH_CEILING,
            "a field table depth limit must lie in 1..=TABLE_DEPTH_CEILING"
        );
        Self {
            depth_max,
            headers_size_max_bytes,
        }
    }

    pub const fn depth_max(&self) -> u32 {
        self.depth_max
    }

    pub const fn headers_size_max_bytes(&self) -> u32 {
        self.headers_size_max_bytes
    }
}

impl Default for TableLimits {
    fn default() -> Self {
        Self::new(TABLE_DEPTH_MAX_DEFAULT, HEADERS_SIZE_MAX_BYTES_DEFAULT)
    }
}

/// Why the field tables of a frame payload were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The bytes are not what the frame's layout says: truncated, a length
    /// that overruns its container, an unknown value type, a key that is not
    /// UTF-8, or a content header with a continued property flags word.
    #[error("malformed field table")]
    Malformed,
    #[error("field table nests deeper than {depth_max} levels")]
    TooDeep { depth_max: u32 },
    #[error("headers table of {size_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    HeadersTooLarge { size_bytes: u32, max_bytes: u32 },
}

/// Checks the field table at the start of `bytes` (its length word first)
/// and returns how many bytes it occupies, length word included.
///
/// Bytes after the table are not looked at. A table this accepts,
/// `amq_protocol::types::parsing::parse_field_table` accepts with the same
/// length; one this calls [`TableError::Malformed`], it refuses.
pub fn scan_field_table(bytes: &[u8], limits: &TableLimits) -> Result<usize, TableError> {
    let depth_max = limits.depth_max as usize;
    // The end offset of each open container, outermost first, and which of
    // them are arrays (bit `d` for the container at depth `d + 1`): a table's
    // entries are key and value, an array's are values alone.
    let mut ends = [0usize; TABLE_DEPTH_CEILING as usize];
    let mut arrays: u64 = 0;
    let mut cursor = Cursor::new(bytes);
    ends[0] = cursor.container(bytes.len())?;
    let mut depth = 1;
    loop {
        let end = ends[depth - 1];
        if cursor.position == end {
            depth -= 1;
            if depth == 0 {
                return Ok(end);
            }
            continue;
        }
        let in_array = arrays & (1 << (depth - 1)) != 0;
        if !in_array {
            let key = cursor.short_string(end)?;
            if str::from_utf8(key).is_err() {
                return Err(TableError::Malformed);
            }
        }
        let value_type = cursor.take(1, end)?[0];
        let width = match value_type {
            b'V' => 0,
            b't' | b'b' | b'B' => 1,
            // 's' is RabbitMQ's short int, where the specification says 'U'.
            b's' | b'U' | b'u' => 2,
            b'I' | b'i' | b'f' => 4,
            // Decimal: scale (1) and value (4).
            b'D' => 5,
            // RabbitMQ reads both 'l' and 'L' as a signed 64-bit integer.
            b'l' | b'L' | b'd' | b'T' => 8,
            b'S' | b'x' => {
                let length = cursor.u32(end)?;
                cursor.take(length as usize, end)?;
                continue;
            }
            b'F' | b'A' => {
                let child_end = cursor.container(end)?;
                if depth == depth_max {
                    return Err(TableError::TooDeep {
                        depth_max: limits.depth_max,
                    });
                }
                ends[depth] = child_end;
                if value_type == b'A' {
                    arrays |= 1 << depth;
                } else {
                    arrays &= !(1 << depth);
                }
                depth += 1;
                continue;
            }
            _ => return Err(TableError::Malformed),
        };
        cursor.take(width, end)?;
    }
}

/// Checks the field table of a method frame's payload, if its method has
/// one. Methods without a table and unknown methods pass: the parser decides
/// about them, and it does not recurse.
pub fn scan_method(payload: &[u8], limits: &TableLimits) -> Result<(), TableError> {
    let mut cursor = Cursor::new(payload);
    let end = payload.len();
    let Ok(ids) = cursor.take(4, end) else {
        return Ok(());
    };
    let class_id = u16::from_be_bytes([ids[0], ids[1]]);
    let method_id = u16::from_be_bytes([ids[2], ids[3]]);
    let Some(fields) = fields_before_table(class_id, method_id) else {
        return Ok(());
    };
    for field in fields {
        match field {
            Field::Octet => cursor.take(1, end).map(drop)?,
            Field::Short => cursor.take(2, end).map(drop)?,
            Field::ShortString => cursor.short_string(end).map(drop)?,
        }
    }
    scan_field_table(&payload[cursor.position..], limits).map(drop)
}

/// Checks a content header frame's payload: its `headers` table against both
/// limits. The other properties cannot nest and are left to the parser.
///
/// A flags word with its continuation bit set is refused: the basic class's
/// fourteen properties fit in one word, so a second word could only describe
/// properties that do not exist, and `amq-protocol` would read it as the
/// first property instead, so the scan and the parser would disagree about
/// where the headers are.
pub fn scan_content_header(payload: &[u8], limits: &TableLimits) -> Result<(), TableError> {
    let mut cursor = Cursor::new(payload);
    let end = payload.len();
    cursor.take(CONTENT_HEADER_FIXED_BYTES, end)?;
    let flags_bytes = cursor.take(2, end)?;
    let flags = u16::from_be_bytes([flags_bytes[0], flags_bytes[1]]);
    if flags & PROPERTY_FLAGS_CONTINUED != 0 {
        return Err(TableError::Malformed);
    }
    if flags & PROPERTY_CONTENT_TYPE != 0 {
        cursor.short_string(end)?;
    }
    if flags & PROPERTY_CONTENT_ENCODING != 0 {
        cursor.short_string(end)?;
    }
    if flags & PROPERTY_HEADERS == 0 {
        return Ok(());
    }
    let headers = &payload[cursor.position..];
    // The size is checked before the walk so that an oversized table costs
    // no more than reading its length, and only once the table is known to
    // fit in the frame, so that a truncated frame is reported as malformed.
    let size_bytes = Cursor::new(headers).u32(headers.len())?;
    if size_bytes as usize > headers.len() - LENGTH_WORD_BYTES {
        return Err(TableError::Malformed);
    }
    if size_bytes > limits.headers_size_max_bytes {
        return Err(TableError::HeadersTooLarge {
            size_bytes,
            max_bytes: limits.headers_size_max_bytes,
        });
    }
    scan_field_table(headers, limits).map(drop)
}

/// A field of a method's arguments that can come before its field table.
#[derive(Debug, Clone, Copy)]
enum Field {
    /// An octet, or the octet holding up to eight bit fields.
    Octet,
    Short,
    ShortString,
}

/// The fields each method has before its field table, in
/// `amq-protocol` 10.6.3's generated parsers: every method whose parser calls
/// `parse_field_table`. The crate is pinned with `=` so that an upgrade is a
/// deliberate change that revisits this list.
fn fields_before_table(class_id: u16, method_id: u16) -> Option<&'static [Field]> {
    use Field::{Octet, Short, ShortString};
    match (class_id, method_id) {
        // connection.start: version-major, version-minor, server-properties.
        // Only a server sends it, but the parser parses it from any peer.
        (10, 10) => Some(&[Octet, Octet]),
        // connection.start-ok: client-properties comes first.
        (10, 11) => Some(&[]),
        // exchange.declare: ticket, exchange, type, bits, arguments.
        (40, 10) => Some(&[Short, ShortString, ShortString, Octet]),
        // exchange.bind and exchange.unbind: ticket, destination, source,
        // routing-key, bits, arguments.
        (40, 30) | (40, 40) => Some(&[Short, ShortString, ShortString, ShortString, Octet]),
        // queue.declare: ticket, queue, bits, arguments.
        (50, 10) => Some(&[Short, ShortString, Octet]),
        // queue.bind: ticket, queue, exchange, routing-key, bits, arguments.
        (50, 20) => Some(&[Short, ShortString, ShortString, ShortString, Octet]),
        // queue.unbind: ticket, queue, exchange, routing-key, arguments; it
        // has no bit fields.
        (50, 50) => Some(&[Short, ShortString, ShortString, ShortString]),
        // basic.consume: ticket, queue, consumer-tag, bits, arguments.
        (60, 20) => Some(&[Short, ShortString, ShortString, Octet]),
        _ => None,
    }
}

/// A read position in a payload. Every read names the end of the container
/// it happens in, so nothing inside a container can read past it.
struct Cursor<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, position: 0 }
    }

    fn take(&mut self, count: usize, end: usize) -> Result<&'a [u8], TableError> {
        debug_assert!(end <= self.bytes.len());
        let start = self.position;
        let next = start
            .checked_add(count)
            .filter(|&next| next <= end)
            .ok_or(TableError::Malformed)?;
        self.position = next;
        Ok(&self.bytes[start..next])
    }

    fn u32(&mut self, end: usize) -> Result<u32, TableError> {
        let bytes = self.take(LENGTH_WORD_BYTES, end)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn short_string(&mut self, end: usize) -> Result<&'a [u8], TableError> {
        let length = self.take(1, end)?[0];
        self.take(length as usize, end)
    }

    /// Reads a container's length word and returns where the container
    /// ends, which must be inside the enclosing container.
    fn container(&mut self, end: usize) -> Result<usize, TableError> {
        let length = self.u32(end)? as usize;
        self.position
            .checked_add(length)
            .filter(|&container_end| container_end <= end)
            .ok_or(TableError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::generation::gen_field_table;
    use amq_protocol::types::parsing::parse_field_table;
    use amq_protocol::types::{AMQPValue, FieldTable};
    use cookie_factory::gen_simple;

    fn encode(table: &FieldTable) -> Vec<u8> {
        gen_simple(gen_field_table(table), Vec::new()).unwrap()
    }

    #[test]
    fn the_specification_and_rabbitmq_spellings_are_both_accepted() {
        // 'U' (the specification's short int) and 'L' are not what
        // amq-protocol writes, but it reads them, so the scan must too.
        let bytes = [
            0, 0, 0, 16, 1, b'a', b'U', 0, 1, 1, b'b', b'L', 0, 0, 0, 0, 0, 0, 0, 2,
        ];
        assert_eq!(scan_field_table(&bytes, &TableLimits::default()), Ok(20));
        assert!(parse_field_table(&bytes[..]).is_ok());
    }

    #[test]
    fn siblings_do_not_add_depth() {
        // A table holding two depth-2 tables, then a value after them: the
        // scan must pop back to depth 1 between siblings.
        let mut inner = FieldTable::default();
        inner.insert("k".into(), AMQPValue::Boolean(false));
        let mut table = FieldTable::default();
        table.insert("a".into(), AMQPValue::FieldTable(inner.clone()));
        table.insert("b".into(), AMQPValue::FieldTable(inner));
        table.insert("c".into(), AMQPValue::LongUInt(1));
        let bytes = encode(&table);
        let limits = TableLimits::new(2, HEADERS_SIZE_MAX_BYTES_DEFAULT);
        assert_eq!(scan_field_table(&bytes, &limits), Ok(bytes.len()));
    }

    #[test]
    #[should_panic(expected = "depth limit")]
    fn a_depth_limit_above_the_ceiling_is_a_bug() {
        TableLimits::new(TABLE_DEPTH_CEILING + 1, 0);
    }

    #[test]
    fn malformed_tables_are_refused_like_the_parser_refuses_them() {
        let cases: &[(&str, &[u8])] = &[
            ("empty", &[]),
            ("short length word", &[0, 0, 0]),
            ("length past the end", &[0, 0, 0, 5, 1, b'a', b'V']),
            ("key past the end", &[0, 0, 0, 2, 5, b'a']),
            ("no value type", &[0, 0, 0, 2, 1, b'a']),
            ("unknown value type", &[0, 0, 0, 3, 1, b'a', b'Z']),
            (
                "the encoder's short string type",
                &[0, 0, 0, 5, 1, b'a', b'_', 1, b'x'],
            ),
            ("key not UTF-8", &[0, 0, 0, 3, 1, 0xFF, b'V']),
            (
                "value past the table",
                &[0, 0, 0, 4, 1, b'a', b'I', 0, 0, 0, 0],
            ),
            (
                "long string past the table",
                &[0, 0, 0, 7, 1, b'a', b'S', 0, 0, 0, 1],
            ),
            (
                "nested table past its parent",
                &[0, 0, 0, 7, 1, b'a', b'F', 0, 0, 0, 1, 0],
            ),
            (
                "array element truncated",
                &[0, 0, 0, 8, 1, b'a', b'A', 0, 0, 0, 1, b'I'],
            ),
            (
                "array with an unknown type",
                &[0, 0, 0, 8, 1, b'a', b'A', 0, 0, 0, 1, b'?'],
            ),
            ("huge length word", &[0xFF, 0xFF, 0xFF, 0xFF, 1, b'a', b'V']),
        ];
        for (what, bytes) in cases {
            assert_eq!(
                scan_field_table(bytes, &TableLimits::default()),
                Err(TableError::Malformed),
                "{what}"
            );
            assert!(parse_field_table(*bytes).is_err(), "{what}");
        }
    }

    #[test]
    fn a_truncated_headers_table_is_malformed_whatever_its_declared_size() {
        let mut payload = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
        payload.extend_from_slice(&PROPERTY_HEADERS.to_be_bytes());
        payload.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            scan_content_header(&payload, &TableLimits::default()),
            Err(TableError::Malformed)
        );
    }

    #[test]
    fn a_continued_property_flags_word_is_refused() {
        let mut payload = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
        payload.extend_from_slice(&(PROPERTY_HEADERS | PROPERTY_FLAGS_CONTINUED).to_be_bytes());
        payload.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(
            scan_content_header(&payload, &TableLimits::default()),
            Err(TableError::Malformed)
        );
    }

    #[test]
    fn methods_without_tables_are_left_to_the_parser() {
        let limits = TableLimits::default();
        // basic.publish carries no table; channel.open neither; a payload
        // too short for ids is the parser's to refuse.
        assert_eq!(scan_method(&[0, 60, 0, 40, 0xFF], &limits), Ok(()));
        assert_eq!(scan_method(&[0, 20, 0, 10, 0], &limits), Ok(()));
        assert_eq!(scan_method(&[0, 50], &limits), Ok(()));
    }

    #[test]
    fn a_method_truncated_before_its_table_is_malformed() {
        // queue.declare with a queue name longer than the payload.
        let payload = [0, 50, 0, 10, 0, 0, 9, b'q'];
        assert_eq!(
            scan_method(&payload, &TableLimits::default()),
            Err(TableError::Malformed)
        );
    }
}
