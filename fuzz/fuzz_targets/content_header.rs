//! Arbitrary content header payloads, followed by the body frames of their
//! message, through `FrameDecoder` as a channel receives them.
//!
//! Checks that the header scan and `amq-protocol`'s parser agree about
//! malformed headers; that an accepted header reports the class and body
//! size its bytes declare, which a channel then counts body frames against;
//! that a refused header leaves the stream in step, so its body frames still
//! decode (the channel discards them); and that body frames come out byte
//! for byte as they went in, so what a channel assembles is exactly what the
//! peer sent, whether it matches the declared size or not.
//!
//! Input: one byte that chooses the headers size limit (0 to 4080 bytes),
//! two bytes of header payload length, the header payload, one byte of body
//! chunk size (1 to 256), then the body.

#![no_main]

use amq_protocol::frame::parsing::parse_content_header;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren_proto::{
    FRAME_OVERHEAD_BYTES, Frame, FrameDecoder, FrameError, TABLE_DEPTH_MAX_DEFAULT, TableError,
    TableLimits, table_limits,
};

const CHANNEL: u16 = 1;
const FRAME_MAX_BYTES: u32 = 131_072;
const PROPERTY_FLAGS_CONTINUED: u16 = 1;

fuzz_target!(|data: &[u8]| {
    let Some((&[limit, length_high, length_low], rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let headers_size_max_bytes = u32::from(limit) * 16;
    let payload_length = usize::from(u16::from_be_bytes([length_high, length_low])).min(rest.len());
    let (payload, rest) = rest.split_at(payload_length);
    let (chunk_size, body) = match rest.split_first() {
        Some((&chunk, body)) => (usize::from(chunk) + 1, body),
        None => (1, &[][..]),
    };
    let limits = TableLimits::new(TABLE_DEPTH_MAX_DEFAULT, headers_size_max_bytes);

    let scanned = table_limits::scan_content_header(payload, &limits);
    let flags_continued = payload.get(12..14).is_some_and(|flags| {
        u16::from_be_bytes([flags[0], flags[1]]) & PROPERTY_FLAGS_CONTINUED != 0
    });
    // The one intended disagreement: the parser ignores the continuation
    // bit, the scan refuses it (see scan_content_header).
    if scanned == Err(TableError::Malformed) && !flags_continued {
        assert!(
            parse_content_header(payload).is_err(),
            "the scan calls malformed a header the parser accepts"
        );
    }

    let mut stream = BytesMut::new();
    push_frame(&mut stream, 2, payload);
    let chunks: Vec<&[u8]> = body.chunks(chunk_size).collect();
    for chunk in &chunks {
        push_frame(&mut stream, 3, chunk);
    }
    let decoder = FrameDecoder::new(FRAME_MAX_BYTES).with_table_limits(limits);
    match decoder.decode(&mut stream) {
        Ok(Some(Frame::Header {
            channel,
            class_id,
            body_size,
            properties,
        })) => {
            assert_eq!(scanned, Ok(()));
            assert_eq!(channel, CHANNEL);
            assert_eq!(class_id, u16::from_be_bytes([payload[0], payload[1]]));
            assert_eq!(body_size.to_be_bytes(), payload[4..12]);
            if properties.headers().is_some() {
                assert!(headers_size(payload) <= headers_size_max_bytes);
            }
        }
        Err(FrameError::HeadersTooLarge {
            channel,
            size_bytes,
            max_bytes,
        }) => {
            assert_eq!(channel, CHANNEL);
            assert_eq!(max_bytes, headers_size_max_bytes);
            assert!(size_bytes > max_bytes);
        }
        Err(FrameError::Malformed { channel, .. } | FrameError::TableTooDeep { channel, .. }) => {
            assert_eq!(channel, CHANNEL);
            assert!(
                scanned.is_err() || parse_content_header(payload).is_err() || trailing(payload)
            );
        }
        other => panic!("a well-framed content header decoded as {other:?}"),
    }

    // The body frames follow whatever happened to the header.
    let mut assembled = Vec::new();
    for chunk in &chunks {
        match decoder.decode(&mut stream) {
            Ok(Some(Frame::Body(channel, bytes))) => {
                assert_eq!(channel, CHANNEL);
                assert_eq!(&bytes[..], *chunk);
                assembled.extend_from_slice(&bytes);
            }
            other => panic!("a body frame decoded as {other:?}"),
        }
    }
    assert_eq!(decoder.decode(&mut stream), Ok(None));
    assert!(stream.is_empty());
    assert_eq!(assembled, body);
});

fn push_frame(stream: &mut BytesMut, frame_type: u8, payload: &[u8]) {
    assert!(payload.len() + FRAME_OVERHEAD_BYTES <= FRAME_MAX_BYTES as usize);
    stream.extend_from_slice(&[frame_type]);
    stream.extend_from_slice(&CHANNEL.to_be_bytes());
    stream.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    stream.extend_from_slice(payload);
    stream.extend_from_slice(&[0xCE]);
}

/// The length word of an accepted header's `headers` table, found the way
/// the scan finds it: after the content type and encoding, when present.
fn headers_size(payload: &[u8]) -> u32 {
    let flags = u16::from_be_bytes([payload[12], payload[13]]);
    let mut position = 14;
    for bit in [15, 14] {
        if flags & (1 << bit) != 0 {
            position += 1 + usize::from(payload[position]);
        }
    }
    let word = &payload[position..position + 4];
    u32::from_be_bytes([word[0], word[1], word[2], word[3]])
}

/// Whether the parser leaves bytes over after the properties, which the
/// decoder refuses although the scan (which stops at the headers) does not.
fn trailing(payload: &[u8]) -> bool {
    matches!(parse_content_header(payload), Ok((rest, _)) if !rest.is_empty())
}
