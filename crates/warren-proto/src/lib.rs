//! AMQP 0-9-1 framing for Warren: bytes in, frames out, frames in, bytes out.
//!
//! The method, property and field-table codec is the `amq-protocol` crate's;
//! this crate wraps it with the three things a server needs and the crate does
//! not give:
//!
//! * a frame splitter that checks the declared frame size against the
//!   negotiated `frame_max` *before* buffering the payload, so a peer cannot
//!   make the broker hold a 4 GiB frame, and that hands body payloads out as
//!   zero-copy [`Bytes`] slices of the read buffer;
//! * the `prefetch_size` field of `basic.qos`, which `amq-protocol` parses and
//!   discards: RabbitMQ refuses a non-zero value with 540 NOT_IMPLEMENTED, so
//!   the broker has to see it;
//! * limits on field tables (nesting depth, and the size of a message's
//!   `headers`), checked by a non-recursive scan before `amq-protocol`'s
//!   recursive parser sees them, so that a deeply nested table cannot
//!   overflow the parser's stack (see [`table_limits`]);
//! * encoders that append straight into one reusable output buffer, so a
//!   connection's writer batches many frames into one socket write.
//!
//! Nothing here does I/O.

use amq_protocol::frame::{AMQPFrame, gen_frame};
use amq_protocol::protocol::{AMQPClass, BasicProperties, basic, parse_class};
use amq_protocol::types::generation::{
    gen_id, gen_long_long_uint, gen_short_short_uint, gen_short_uint, gen_with_len,
};
use bytes::{Buf, Bytes, BytesMut};
use cookie_factory::{WriteContext, sequence::tuple};

pub use amq_protocol::frame::ProtocolVersion;
pub use amq_protocol::protocol;
pub use amq_protocol::types;

pub mod table_limits;

pub use table_limits::{
    HEADERS_SIZE_MAX_BYTES_DEFAULT, TABLE_DEPTH_CEILING, TABLE_DEPTH_MAX_DEFAULT, TableError,
    TableLimits,
};

/// The eight bytes a client sends first: "AMQP" 0 0 9 1.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";

/// Bytes of framing around every frame payload: type (1), channel (2), size (4), frame-end (1).
pub const FRAME_OVERHEAD_BYTES: usize = 8;

/// The smallest frame_max a peer may negotiate (AMQP 0-9-1 §4.2.3).
pub const FRAME_MIN_SIZE_BYTES: u32 = 4096;

const FRAME_TYPE_METHOD: u8 = 1;
const FRAME_TYPE_HEADER: u8 = 2;
const FRAME_TYPE_BODY: u8 = 3;
const FRAME_TYPE_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;

const CLASS_BASIC: u16 = 60;
const METHOD_BASIC_QOS: u16 = 10;

/// A frame received from a peer.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Method(u16, Box<AMQPClass>),
    /// `basic.qos`, decoded here rather than by `amq-protocol` so that
    /// `prefetch_size` survives.
    BasicQos {
        channel: u16,
        prefetch_size: u32,
        prefetch_count: u16,
        global: bool,
    },
    Header {
        channel: u16,
        class_id: u16,
        body_size: u64,
        properties: Box<BasicProperties>,
    },
    Body(u16, Bytes),
    Heartbeat(u16),
}

impl Frame {
    pub fn channel(&self) -> u16 {
        match self {
            Frame::Method(channel, _)
            | Frame::Body(channel, _)
            | Frame::Heartbeat(channel)
            | Frame::BasicQos { channel, .. }
            | Frame::Header { channel, .. } => *channel,
        }
    }
}

/// Why a byte stream is not valid AMQP 0-9-1 framing, or a frame broke a
/// limit. Every variant is a connection error 501 FRAME_ERROR except
/// [`FrameError::HeadersTooLarge`].
///
/// [`FrameError::Malformed`], [`FrameError::TableTooDeep`] and
/// [`FrameError::HeadersTooLarge`] are returned only after the whole frame
/// has been taken off the buffer, so the stream stays in step and the next
/// `decode` starts at the next frame; the other variants leave the buffer as
/// it was, and the stream cannot be trusted after them.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error(
        "frame of {size_bytes} bytes exceeds the negotiated frame_max of {frame_max_bytes} bytes"
    )]
    TooLarge {
        size_bytes: u64,
        frame_max_bytes: u32,
    },
    #[error("frame end byte is 0x{found:02X}, expected 0xCE")]
    BadFrameEnd { found: u8 },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("malformed {what} frame on channel {channel}")]
    Malformed { what: &'static str, channel: u16 },
    /// A field table (method arguments, client properties or message
    /// headers) nests deeper than the decoder's limit. The frame is not
    /// parsed at all: parsing it is what the limit prevents.
    #[error("field table on channel {channel} nests deeper than {depth_max} levels")]
    TableTooDeep { channel: u16, depth_max: u32 },
    /// A content header's `headers` table is larger than the decoder's
    /// limit. The message is refused but the stream is intact, so this is a
    /// channel error (406 PRECONDITION_FAILED, as RabbitMQ refuses a message
    /// over its size limit); the body frames that follow belong to the
    /// refused message and must be discarded with the closing channel.
    #[error(
        "headers table of {size_bytes} bytes on channel {channel} exceeds the limit of {max_bytes} bytes"
    )]
    HeadersTooLarge {
        channel: u16,
        size_bytes: u32,
        max_bytes: u32,
    },
}

/// Whether the first eight bytes of a connection are the AMQP 0-9-1 header.
pub fn is_protocol_header(first_bytes: &[u8; 8]) -> bool {
    *first_bytes == PROTOCOL_HEADER
}

/// Splits a byte stream into frames, enforcing a maximum frame size and the
/// [`TableLimits`] on field tables.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    frame_max_bytes: u32,
    table_limits: TableLimits,
}

impl FrameDecoder {
    /// `frame_max_bytes` counts the whole frame including its 8 bytes of
    /// framing, as `connection.tune` does; 0 means no limit beyond u32.
    /// Field tables get the default [`TableLimits`].
    pub fn new(frame_max_bytes: u32) -> Self {
        Self {
            frame_max_bytes,
            table_limits: TableLimits::default(),
        }
    }

    pub fn with_table_limits(mut self, table_limits: TableLimits) -> Self {
        self.table_limits = table_limits;
        self
    }

    pub fn set_frame_max(&mut self, frame_max_bytes: u32) {
        self.frame_max_bytes = frame_max_bytes;
    }

    pub fn set_table_limits(&mut self, table_limits: TableLimits) {
        self.table_limits = table_limits;
    }

    pub fn table_limits(&self) -> TableLimits {
        self.table_limits
    }

    /// Takes one complete frame off the front of `buffer`, or returns
    /// `Ok(None)` when more bytes are needed.
    pub fn decode(&self, buffer: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buffer.len() < 7 {
            return Ok(None);
        }
        let frame_type = buffer[0];
        let channel = u16::from_be_bytes([buffer[1], buffer[2]]);
        let payload_size = u32::from_be_bytes([buffer[3], buffer[4], buffer[5], buffer[6]]);
        let frame_size = payload_size as u64 + FRAME_OVERHEAD_BYTES as u64;
        if self.frame_max_bytes != 0 && frame_size > self.frame_max_bytes as u64 {
            return Err(FrameError::TooLarge {
                size_bytes: frame_size,
                frame_max_bytes: self.frame_max_bytes,
            });
        }
        if !matches!(
            frame_type,
            FRAME_TYPE_METHOD | FRAME_TYPE_HEADER | FRAME_TYPE_BODY | FRAME_TYPE_HEARTBEAT
        ) {
            return Err(FrameError::UnknownType(frame_type));
        }
        let frame_size = frame_size as usize;
        if buffer.len() < frame_size {
            buffer.reserve(frame_size - buffer.len());
            return Ok(None);
        }
        let end = buffer[frame_size - 1];
        if end != FRAME_END {
            return Err(FrameError::BadFrameEnd { found: end });
        }
        buffer.advance(7);
        let payload = buffer.split_to(payload_size as usize).freeze();
        buffer.advance(1);
        decode_payload(frame_type, channel, payload, &self.table_limits).map(Some)
    }
}

fn decode_payload(
    frame_type: u8,
    channel: u16,
    payload: Bytes,
    limits: &TableLimits,
) -> Result<Frame, FrameError> {
    match frame_type {
        FRAME_TYPE_METHOD => {
            table_limits::scan_method(&payload, limits)
                .map_err(|error| table_error(error, "method", channel))?;
            decode_method(channel, &payload)
        }
        FRAME_TYPE_HEADER => {
            let what = "content header";
            table_limits::scan_content_header(&payload, limits)
                .map_err(|error| table_error(error, what, channel))?;
            let malformed = FrameError::Malformed { what, channel };
            match amq_protocol::frame::parsing::parse_content_header(&payload[..]) {
                Ok((&[], header)) => Ok(Frame::Header {
                    channel,
                    class_id: header.class_id,
                    body_size: header.body_size,
                    properties: Box::new(header.properties),
                }),
                _ => Err(malformed),
            }
        }
        FRAME_TYPE_BODY => Ok(Frame::Body(channel, payload)),
        FRAME_TYPE_HEARTBEAT => Ok(Frame::Heartbeat(channel)),
        other => Err(FrameError::UnknownType(other)),
    }
}

fn table_error(error: TableError, what: &'static str, channel: u16) -> FrameError {
    match error {
        TableError::Malformed => FrameError::Malformed { what, channel },
        TableError::TooDeep { depth_max } => FrameError::TableTooDeep { channel, depth_max },
        TableError::HeadersTooLarge {
            size_bytes,
            max_bytes,
        } => FrameError::HeadersTooLarge {
            channel,
            size_bytes,
            max_bytes,
        },
    }
}

fn decode_method(channel: u16, payload: &[u8]) -> Result<Frame, FrameError> {
    let malformed = FrameError::Malformed {
        what: "method",
        channel,
    };
    if payload.len() >= 4 {
        let class_id = u16::from_be_bytes([payload[0], payload[1]]);
        let method_id = u16::from_be_bytes([payload[2], payload[3]]);
        if class_id == CLASS_BASIC && method_id == METHOD_BASIC_QOS {
            // prefetch-size (long), prefetch-count (short), global (bit).
            if payload.len() != 4 + 4 + 2 + 1 {
                return Err(malformed);
            }
            return Ok(Frame::BasicQos {
                channel,
                prefetch_size: u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
                prefetch_count: u16::from_be_bytes([payload[8], payload[9]]),
                global: payload[10] & 1 == 1,
            });
        }
    }
    match parse_class(payload) {
        Ok((&[], method)) => Ok(Frame::Method(channel, Box::new(method))),
        _ => Err(malformed),
    }
}

/// Appends frames to a reusable output buffer.
///
/// Encoding cannot fail for well-formed values; a failure means a value broke
/// an invariant of the codec (a short string over 255 bytes, say), which is a
/// bug in the caller, so it panics with the reason.
#[derive(Debug, Default)]
pub struct FrameEncoder {
    buffer: Vec<u8>,
}

impl FrameEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buffer
    }

    pub fn clear(&mut self) {
        self.buffer.clear();
    }

    pub fn protocol_header(&mut self) {
        self.buffer.extend_from_slice(&PROTOCOL_HEADER);
    }

    pub fn heartbeat(&mut self) {
        self.buffer
            .extend_from_slice(&[FRAME_TYPE_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
    }

    pub fn method(&mut self, channel: u16, method: &AMQPClass) {
        let frame = AMQPFrame::Method(channel, method.clone());
        self.frame(&frame);
    }

    fn frame(&mut self, frame: &AMQPFrame) {
        let buffer = std::mem::take(&mut self.buffer);
        let context = gen_frame(frame)(WriteContext::from(buffer))
            .unwrap_or_else(|error| panic!("encoding {frame} failed: {error:?}"));
        self.buffer = context.write;
    }

    /// A content header and its body split into frames no larger than
    /// `frame_max_bytes`.
    pub fn content(
        &mut self,
        channel: u16,
        properties: &BasicProperties,
        body: &[u8],
        frame_max_bytes: u32,
    ) {
        let buffer = std::mem::take(&mut self.buffer);
        let header = tuple((
            gen_short_short_uint(FRAME_TYPE_HEADER),
            gen_id(channel),
            gen_with_len(tuple((
                gen_id(CLASS_BASIC),
                gen_short_uint(0),
                gen_long_long_uint(body.len() as u64),
                basic::gen_properties(properties),
            ))),
            gen_short_short_uint(FRAME_END),
        ));
        let context = header(WriteContext::from(buffer))
            .unwrap_or_else(|error| panic!("encoding a content header failed: {error:?}"));
        self.buffer = context.write;
        let chunk_max = (frame_max_bytes as usize)
            .saturating_sub(FRAME_OVERHEAD_BYTES)
            .max(1);
        for chunk in body.chunks(chunk_max) {
            self.buffer.push(FRAME_TYPE_BODY);
            self.buffer.extend_from_slice(&channel.to_be_bytes());
            self.buffer
                .extend_from_slice(&(chunk.len() as u32).to_be_bytes());
            self.buffer.extend_from_slice(chunk);
            self.buffer.push(FRAME_END);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::{channel, queue};

    fn encoded(method: AMQPClass) -> BytesMut {
        let mut encoder = FrameEncoder::new();
        encoder.method(3, &method);
        BytesMut::from(encoder.bytes())
    }

    #[test]
    fn method_round_trips() {
        let method = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "jobs".into(),
            durable: true,
            ..Default::default()
        }));
        let mut bytes = encoded(method.clone());
        let frame = FrameDecoder::new(131072).decode(&mut bytes).unwrap();
        assert_eq!(frame, Some(Frame::Method(3, Box::new(method))));
        assert!(bytes.is_empty());
    }

    #[test]
    fn partial_frame_waits_for_more_bytes() {
        let bytes = encoded(AMQPClass::Channel(channel::AMQPMethod::Open(
            channel::Open {},
        )));
        let mut partial = BytesMut::from(&bytes[..bytes.len() - 1]);
        assert_eq!(FrameDecoder::new(0).decode(&mut partial), Ok(None));
    }

    #[test]
    fn oversized_frame_is_refused_before_its_payload_arrives() {
        let mut header_only = BytesMut::from(&[FRAME_TYPE_BODY, 0, 1, 0, 1, 0, 0][..]);
        assert_eq!(
            FrameDecoder::new(4096).decode(&mut header_only),
            Err(FrameError::TooLarge {
                size_bytes: 65536 + 8,
                frame_max_bytes: 4096
            })
        );
    }

    #[test]
    fn bad_frame_end_is_refused() {
        let mut bytes = encoded(AMQPClass::Channel(channel::AMQPMethod::Open(
            channel::Open {},
        )));
        let last = bytes.len() - 1;
        bytes[last] = 0;
        assert_eq!(
            FrameDecoder::new(0).decode(&mut bytes),
            Err(FrameError::BadFrameEnd { found: 0 })
        );
    }

    #[test]
    fn qos_keeps_prefetch_size() {
        let mut bytes = BytesMut::new();
        bytes.extend_from_slice(&[FRAME_TYPE_METHOD, 0, 1, 0, 0, 0, 11]);
        bytes.extend_from_slice(&[0, 60, 0, 10, 0, 0, 1, 0, 0, 5, 1, FRAME_END]);
        assert_eq!(
            FrameDecoder::new(0).decode(&mut bytes).unwrap(),
            Some(Frame::BasicQos {
                channel: 1,
                prefetch_size: 256,
                prefetch_count: 5,
                global: true
            })
        );
    }

    #[test]
    fn content_is_split_at_frame_max() {
        let mut encoder = FrameEncoder::new();
        let body = vec![7u8; 10_000];
        encoder.content(1, &BasicProperties::default(), &body, 4096);
        let mut bytes = BytesMut::from(encoder.bytes());
        let decoder = FrameDecoder::new(4096);
        let Some(Frame::Header { body_size, .. }) = decoder.decode(&mut bytes).unwrap() else {
            panic!("expected a content header");
        };
        assert_eq!(body_size, 10_000);
        let mut received = Vec::new();
        while let Some(frame) = decoder.decode(&mut bytes).unwrap() {
            let Frame::Body(1, chunk) = frame else {
                panic!("expected a body frame")
            };
            assert!(chunk.len() <= 4096 - FRAME_OVERHEAD_BYTES);
            received.extend_from_slice(&chunk);
        }
        assert_eq!(received, body);
    }
}
