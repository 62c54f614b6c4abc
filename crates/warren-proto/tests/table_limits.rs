//! The field-table limits as the broker meets them: frames in a byte stream,
//! through `FrameDecoder::decode`. Well-formed frames come from
//! `amq-protocol`'s own encoder; hostile ones are built byte by byte, because
//! that encoder is recursive too and could not write them.

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, gen_frame};
use bytes::BytesMut;
use cookie_factory::gen_simple;
use warren_proto::protocol::{AMQPClass, BasicProperties, basic, connection, exchange, queue};
use warren_proto::table_limits::{scan_content_header, scan_field_table};
use warren_proto::types::generation::gen_field_table;
use warren_proto::types::parsing::parse_field_table;
use warren_proto::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use warren_proto::{
    Frame, FrameDecoder, FrameError, HEADERS_SIZE_MAX_BYTES_DEFAULT, TABLE_DEPTH_CEILING,
    TABLE_DEPTH_MAX_DEFAULT, TableError, TableLimits,
};

const CHANNEL: u16 = 7;
const HOSTILE_DEPTH: usize = 10_000;
const PROPERTY_CONTENT_TYPE: u16 = 1 << 15;
const PROPERTY_HEADERS: u16 = 1 << 13;

fn encoded(frame: &AMQPFrame) -> BytesMut {
    BytesMut::from(&gen_simple(gen_frame(frame), Vec::new()).unwrap()[..])
}

/// A frame of `frame_type` on [`CHANNEL`] around `payload`.
fn raw_frame(frame_type: u8, payload: &[u8]) -> BytesMut {
    let mut bytes = BytesMut::new();
    bytes.extend_from_slice(&[frame_type]);
    bytes.extend_from_slice(&CHANNEL.to_be_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes.extend_from_slice(&[0xCE]);
    bytes
}

fn heartbeat() -> [u8; 8] {
    [8, 0, 0, 0, 0, 0, 0, 0xCE]
}

/// A field table nested `depth` levels, each level the only entry of the one
/// around it. It is written front to back, because each level's length is
/// known in advance: below the top, a table level costs 7 bytes (key length,
/// key, type, length word) and an array level 5 (type, length word). The
/// top level is always a table, so its one entry always has a key.
fn nested_table_bytes(depth: usize, arrays: bool) -> Vec<u8> {
    let level_bytes = if arrays { 5 } else { 7 };
    let container_type = if arrays { b'A' } else { b'F' };
    let length_at = |level: usize| ((depth - level) * level_bytes) as u32;
    let mut bytes = Vec::with_capacity(depth * level_bytes + 8);
    let top_length = if depth == 1 { 0 } else { 7 + length_at(2) };
    bytes.extend_from_slice(&top_length.to_be_bytes());
    for level in 2..=depth {
        if level == 2 || !arrays {
            bytes.extend_from_slice(&[1, b'a']);
        }
        bytes.push(container_type);
        bytes.extend_from_slice(&length_at(level).to_be_bytes());
    }
    bytes
}

/// A field table nested `depth` levels deep as `amq-protocol` values,
/// alternating arrays and tables below the top.
fn nested(depth: usize) -> FieldTable {
    let mut top = FieldTable::default();
    if depth == 1 {
        return top;
    }
    let mut value = AMQPValue::FieldTable(FieldTable::default());
    for level in (2..depth).rev() {
        value = if level % 2 == 0 {
            AMQPValue::FieldArray(FieldArray::from(vec![value]))
        } else {
            let mut table = FieldTable::default();
            table.insert("n".into(), value);
            AMQPValue::FieldTable(table)
        };
    }
    top.insert("n".into(), value);
    top
}

fn every_value_type() -> FieldTable {
    let mut death = FieldTable::default();
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    death.insert("queue".into(), AMQPValue::LongString("jobs".into()));
    death.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString("k".into())])),
    );
    let mut table = FieldTable::default();
    table.insert("t".into(), AMQPValue::Boolean(true));
    table.insert("b".into(), AMQPValue::ShortShortInt(-1));
    table.insert("B".into(), AMQPValue::ShortShortUInt(200));
    table.insert("s".into(), AMQPValue::ShortInt(-300));
    table.insert("u".into(), AMQPValue::ShortUInt(60000));
    table.insert("I".into(), AMQPValue::LongInt(-70000));
    table.insert("i".into(), AMQPValue::LongUInt(4_000_000_000));
    table.insert("l".into(), AMQPValue::LongLongInt(-1 << 40));
    table.insert("f".into(), AMQPValue::Float(1.5));
    table.insert("d".into(), AMQPValue::Double(2.25));
    table.insert(
        "D".into(),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 12345,
        }),
    );
    table.insert("S".into(), AMQPValue::LongString("héllo".into()));
    table.insert("T".into(), AMQPValue::Timestamp(1_700_000_000));
    table.insert(
        "x".into(),
        AMQPValue::ByteArray(ByteArray::from(vec![0, 1, 255])),
    );
    table.insert("V".into(), AMQPValue::Void);
    table.insert("F".into(), AMQPValue::FieldTable(death.clone()));
    table.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    table
}

#[test]
fn nesting_is_counted_from_the_top_level_table() {
    let limits = TableLimits::new(3, HEADERS_SIZE_MAX_BYTES_DEFAULT);
    for depth in 1..=3 {
        let bytes = encode_table(&nested(depth));
        assert_eq!(
            scan_field_table(&bytes, &limits),
            Ok(bytes.len()),
            "{depth}"
        );
    }
    assert_eq!(
        scan_field_table(&encode_table(&nested(4)), &limits),
        Err(TableError::TooDeep { depth_max: 3 })
    );
}

#[test]
fn the_deepest_supported_limit_is_enforced() {
    let ceiling = TABLE_DEPTH_CEILING as usize;
    let limits = TableLimits::new(TABLE_DEPTH_CEILING, HEADERS_SIZE_MAX_BYTES_DEFAULT);
    let at_limit = encode_table(&nested(ceiling));
    assert_eq!(scan_field_table(&at_limit, &limits), Ok(at_limit.len()));
    assert_eq!(
        scan_field_table(&encode_table(&nested(ceiling + 1)), &limits),
        Err(TableError::TooDeep {
            depth_max: TABLE_DEPTH_CEILING
        })
    );
}

fn encode_table(table: &FieldTable) -> Vec<u8> {
    gen_simple(gen_field_table(table), Vec::new()).unwrap()
}

#[test]
fn every_value_type_is_scanned_to_its_exact_length() {
    let mut bytes = encode_table(&every_value_type());
    let length = bytes.len();
    bytes.extend_from_slice(b"trailing");
    assert_eq!(
        scan_field_table(&bytes, &TableLimits::default()),
        Ok(length)
    );
    let (rest, _) = parse_field_table(&bytes[..]).unwrap();
    assert_eq!(rest, b"trailing");
}

#[test]
fn content_header_headers_are_found_after_the_string_properties() {
    let headers = encode_table(&every_value_type());
    // basic class, weight 0, body size 3; content-type, content-encoding
    // and headers present.
    let mut payload = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
    payload.extend_from_slice(&(0b1110_0000_0000_0000u16).to_be_bytes());
    payload.extend_from_slice(&[4, b't', b'e', b'x', b't', 0]);
    payload.extend_from_slice(&headers);
    assert_eq!(
        scan_content_header(&payload, &TableLimits::default()),
        Ok(())
    );
    let tight = TableLimits::new(TABLE_DEPTH_MAX_DEFAULT, headers.len() as u32 - 5);
    assert_eq!(
        scan_content_header(&payload, &tight),
        Err(TableError::HeadersTooLarge {
            size_bytes: headers.len() as u32 - 4,
            max_bytes: headers.len() as u32 - 5,
        })
    );
}

/// One of each method that carries a field table, with `table` in it and
/// every string before the table non-empty, so that a wrong field layout
/// would look for the table in the wrong place.
fn methods_with_table(table: &FieldTable) -> Vec<AMQPClass> {
    let table = || table.clone();
    vec![
        AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: table(),
            mechanisms: LongString::from("PLAIN AMQPLAIN"),
            locales: LongString::from("en_US"),
        })),
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: table(),
            mechanism: "PLAIN".into(),
            response: LongString::from("\0guest\0guest"),
            locale: "en_US".into(),
        })),
        AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: "orders".into(),
            kind: "headers".into(),
            passive: false,
            durable: true,
            auto_delete: true,
            internal: false,
            nowait: true,
            arguments: table(),
        })),
        AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
            destination: "to".into(),
            source: "from-here".into(),
            routing_key: "a.b.c".into(),
            nowait: true,
            arguments: table(),
        })),
        AMQPClass::Exchange(exchange::AMQPMethod::Unbind(exchange::Unbind {
            destination: "to".into(),
            source: "from-here".into(),
            routing_key: "a.b.c".into(),
            nowait: false,
            arguments: table(),
        })),
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "jobs".into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: true,
            nowait: false,
            arguments: table(),
        })),
        AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: "jobs".into(),
            exchange: "orders".into(),
            routing_key: "eu.#".into(),
            nowait: true,
            arguments: table(),
        })),
        AMQPClass::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
            queue: "jobs".into(),
            exchange: "orders".into(),
            routing_key: "eu.#".into(),
            arguments: table(),
        })),
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "jobs".into(),
            consumer_tag: "ctag-1".into(),
            no_local: false,
            no_ack: true,
            exclusive: true,
            nowait: false,
            arguments: table(),
        })),
    ]
}

fn content_header(headers: FieldTable) -> AMQPFrame {
    AMQPFrame::Header(
        CHANNEL,
        AMQPContentHeader {
            class_id: 60,
            body_size: 3,
            properties: BasicProperties::default()
                .with_content_type("application/json".into())
                .with_content_encoding("gzip".into())
                .with_headers(headers)
                .with_delivery_mode(2)
                .with_correlation_id("c-1".into()),
        },
    )
}

fn decoded_header(frame: Option<Frame>) -> BasicProperties {
    match frame {
        Some(Frame::Header { properties, .. }) => *properties,
        other => panic!("expected a content header, got {other:?}"),
    }
}

#[test]
fn well_formed_methods_with_tables_decode_unchanged() {
    let decoder = FrameDecoder::new(131_072);
    for method in methods_with_table(&every_value_type()) {
        let mut bytes = encoded(&AMQPFrame::Method(CHANNEL, method.clone()));
        let frame = decoder.decode(&mut bytes).unwrap();
        assert_eq!(frame, Some(Frame::Method(CHANNEL, Box::new(method))));
        assert!(bytes.is_empty());
    }
}

#[test]
fn well_formed_content_headers_decode_unchanged() {
    let decoder = FrameDecoder::new(131_072);
    let frame = content_header(every_value_type());
    let AMQPFrame::Header(_, header) = &frame else {
        unreachable!()
    };
    let mut bytes = encoded(&frame);
    let properties = decoded_header(decoder.decode(&mut bytes).unwrap());
    assert_eq!(properties, header.properties);
}

#[test]
fn every_method_table_is_found_and_limited_where_the_parser_reads_it() {
    // A wrong layout would scan the wrong bytes: it would call these frames
    // malformed, or miss the extra level and let the parser read it.
    let decoder = FrameDecoder::new(0);
    for method in methods_with_table(&nested(TABLE_DEPTH_MAX_DEFAULT as usize)) {
        let mut bytes = encoded(&AMQPFrame::Method(CHANNEL, method.clone()));
        assert_eq!(
            decoder.decode(&mut bytes),
            Ok(Some(Frame::Method(CHANNEL, Box::new(method))))
        );
    }
    for method in methods_with_table(&nested(TABLE_DEPTH_MAX_DEFAULT as usize + 1)) {
        let mut bytes = encoded(&AMQPFrame::Method(CHANNEL, method.clone()));
        assert_eq!(
            decoder.decode(&mut bytes),
            Err(FrameError::TableTooDeep {
                channel: CHANNEL,
                depth_max: TABLE_DEPTH_MAX_DEFAULT
            }),
            "{method:?}"
        );
        assert!(bytes.is_empty());
    }
}

#[test]
fn headers_at_the_depth_limit_are_parsed_and_one_more_level_is_refused() {
    let decoder = FrameDecoder::new(0);
    let at_limit = nested(TABLE_DEPTH_MAX_DEFAULT as usize);
    let mut bytes = encoded(&content_header(at_limit.clone()));
    let properties = decoded_header(decoder.decode(&mut bytes).unwrap());
    assert_eq!(properties.headers().as_ref(), Some(&at_limit));

    let mut bytes = encoded(&content_header(nested(
        TABLE_DEPTH_MAX_DEFAULT as usize + 1,
    )));
    assert_eq!(
        decoder.decode(&mut bytes),
        Err(FrameError::TableTooDeep {
            channel: CHANNEL,
            depth_max: TABLE_DEPTH_MAX_DEFAULT
        })
    );
}

/// queue.declare of "q" with `table` as its arguments.
fn queue_declare_payload(table: &[u8]) -> Vec<u8> {
    let mut payload = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
    payload.extend_from_slice(table);
    payload
}

/// A basic content header with a content type and then `table` as headers.
fn content_header_payload(table: &[u8]) -> Vec<u8> {
    let mut payload = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
    payload.extend_from_slice(&(PROPERTY_CONTENT_TYPE | PROPERTY_HEADERS).to_be_bytes());
    payload.extend_from_slice(&[10]);
    payload.extend_from_slice(b"text/plain");
    payload.extend_from_slice(table);
    payload
}

#[test]
fn a_ten_thousand_deep_table_is_refused_before_the_parser_recurses() {
    // Without the limit, amq-protocol recurses once per level and overflows
    // this test thread's 2 MiB stack, which aborts the whole test binary.
    // The headers size limit is lifted: at 7 bytes a level these headers
    // are 70 KB, and the size check would refuse them before the walk.
    let decoder =
        FrameDecoder::new(0).with_table_limits(TableLimits::new(TABLE_DEPTH_MAX_DEFAULT, u32::MAX));
    for arrays in [false, true] {
        let table = nested_table_bytes(HOSTILE_DEPTH, arrays);
        for payload in [
            queue_declare_payload(&table),
            content_header_payload(&table),
        ] {
            let frame_type = if payload[1] == 50 { 1 } else { 2 };
            let mut bytes = raw_frame(frame_type, &payload);
            bytes.extend_from_slice(&heartbeat());
            assert_eq!(
                decoder.decode(&mut bytes),
                Err(FrameError::TableTooDeep {
                    channel: CHANNEL,
                    depth_max: TABLE_DEPTH_MAX_DEFAULT
                })
            );
            // The refused frame is gone and the next one is intact.
            assert_eq!(decoder.decode(&mut bytes), Ok(Some(Frame::Heartbeat(0))));
        }
    }
}

#[test]
fn the_byte_built_tables_match_the_parser_at_small_depths() {
    // The hostile builder must describe real tables, or the test above would
    // pass for the wrong reason (as malformed rather than too deep).
    let decoder = FrameDecoder::new(0);
    for arrays in [false, true] {
        for depth in 1..=TABLE_DEPTH_MAX_DEFAULT as usize {
            let table = nested_table_bytes(depth, arrays);
            let mut bytes = raw_frame(1, &queue_declare_payload(&table));
            assert!(
                matches!(decoder.decode(&mut bytes), Ok(Some(Frame::Method(..)))),
                "depth {depth}, arrays {arrays}"
            );
        }
    }
}

#[test]
fn a_depth_limit_can_be_lowered() {
    let limits = TableLimits::new(2, HEADERS_SIZE_MAX_BYTES_DEFAULT);
    let mut decoder = FrameDecoder::new(0).with_table_limits(limits);
    assert_eq!(decoder.table_limits(), limits);
    let mut bytes = raw_frame(1, &queue_declare_payload(&nested_table_bytes(3, false)));
    assert_eq!(
        decoder.decode(&mut bytes),
        Err(FrameError::TableTooDeep {
            channel: CHANNEL,
            depth_max: 2
        })
    );
    decoder.set_table_limits(TableLimits::default());
    let mut bytes = raw_frame(1, &queue_declare_payload(&nested_table_bytes(3, false)));
    assert!(decoder.decode(&mut bytes).is_ok());
}

fn headers_of_size(size_bytes: usize) -> FieldTable {
    // One long string entry: key length (1), key (1), type (1), length
    // word (4), then the string.
    let mut headers = FieldTable::default();
    headers.insert(
        "h".into(),
        AMQPValue::LongString(LongString::from(vec![b'z'; size_bytes - 7])),
    );
    headers
}

#[test]
fn headers_over_the_size_limit_close_only_the_message() {
    let max_bytes = 1000;
    let decoder = FrameDecoder::new(0)
        .with_table_limits(TableLimits::new(TABLE_DEPTH_MAX_DEFAULT, max_bytes));

    let mut bytes = encoded(&content_header(headers_of_size(max_bytes as usize)));
    assert!(decoder.decode(&mut bytes).unwrap().is_some());

    let mut bytes = encoded(&content_header(headers_of_size(max_bytes as usize + 1)));
    bytes.extend_from_slice(&encoded(&AMQPFrame::Body(CHANNEL, b"abc".to_vec())));
    assert_eq!(
        decoder.decode(&mut bytes),
        Err(FrameError::HeadersTooLarge {
            channel: CHANNEL,
            size_bytes: max_bytes + 1,
            max_bytes
        })
    );
    // The stream is still in step: the body frame that followed decodes.
    assert_eq!(
        decoder.decode(&mut bytes),
        Ok(Some(Frame::Body(CHANNEL, b"abc".to_vec().into())))
    );
}

#[test]
fn the_default_headers_limit_applies() {
    let decoder = FrameDecoder::new(0);
    let mut bytes = encoded(&content_header(headers_of_size(
        HEADERS_SIZE_MAX_BYTES_DEFAULT as usize + 1,
    )));
    assert!(matches!(
        decoder.decode(&mut bytes),
        Err(FrameError::HeadersTooLarge { .. })
    ));
}

/// The frames a mutation test starts from: every method with a table, and a
/// content header, all carrying every value type.
fn well_formed_frames() -> Vec<BytesMut> {
    let mut frames: Vec<BytesMut> = methods_with_table(&every_value_type())
        .into_iter()
        .map(|method| encoded(&AMQPFrame::Method(CHANNEL, method)))
        .collect();
    frames.push(encoded(&content_header(every_value_type())));
    frames
}

fn assert_refused_or_parsed(decoder: &FrameDecoder, mut bytes: BytesMut, what: &str) {
    match decoder.decode(&mut bytes) {
        Ok(Some(_)) | Err(FrameError::Malformed { .. }) | Err(FrameError::TableTooDeep { .. }) => {
            assert!(bytes.is_empty(), "{what}: frame not consumed");
        }
        other => panic!("{what}: unexpected {other:?}"),
    }
}

#[test]
fn truncated_tables_are_malformed_and_never_panic() {
    let decoder = FrameDecoder::new(0);
    for frame in well_formed_frames() {
        let payload = &frame[7..frame.len() - 1];
        for cut in 0..payload.len() {
            let bytes = raw_frame(frame[0], &payload[..cut]);
            let mut copy = bytes.clone();
            let result = decoder.decode(&mut copy);
            assert!(
                matches!(result, Err(FrameError::Malformed { .. }) | Ok(Some(_))),
                "cut at {cut}: {result:?}"
            );
            assert_refused_or_parsed(&decoder, bytes, &format!("cut at {cut}"));
        }
    }
}

#[test]
fn garbage_in_any_byte_never_panics() {
    let decoder = FrameDecoder::new(0);
    for frame in well_formed_frames() {
        let payload = frame[7..frame.len() - 1].to_vec();
        for position in 0..payload.len() {
            for garbage in [0x00, 0x01, 0x7F, 0x80, 0xFF, b'F', b'A', b'S', b'x', b'V'] {
                let mut mutated = payload.clone();
                mutated[position] = garbage;
                let bytes = raw_frame(frame[0], &mutated);
                assert_refused_or_parsed(&decoder, bytes, &format!("byte {position} = {garbage}"));
            }
        }
    }
}
