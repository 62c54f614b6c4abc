//! Arbitrary bytes through `FrameDecoder::decode`, as a connection's reader
//! feeds it: nothing may panic, a refused frame that the decoder says was
//! consumed must leave the stream in step, and every method or content
//! header it accepts must survive `FrameEncoder` and decode again to the
//! same bytes.
//!
//! Input: two bytes that choose frame_max, then the byte stream that follows
//! the protocol header. frame_max runs from the protocol's minimum of 4 KiB
//! to about 1 MiB; 0 (no limit) is left out because the decoder then
//! reserves whatever a frame declares, up to 4 GiB, which is that setting's
//! documented meaning and not a bug.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren_proto::{FRAME_MIN_SIZE_BYTES, Frame, FrameDecoder, FrameEncoder, FrameError};

fuzz_target!(|data: &[u8]| {
    let Some((selector, stream)) = data.split_first_chunk::<2>() else {
        return;
    };
    let frame_max_bytes = FRAME_MIN_SIZE_BYTES + u32::from(u16::from_be_bytes(*selector)) * 16;
    let decoder = FrameDecoder::new(frame_max_bytes);
    let mut buffer = BytesMut::from(stream);
    loop {
        let before = buffer.len();
        match decoder.decode(&mut buffer) {
            Ok(Some(frame)) => re_encode(&decoder, &frame, frame_max_bytes),
            Ok(None) => break,
            // The frame was taken off the buffer: the next one can follow.
            Err(
                FrameError::Malformed { .. }
                | FrameError::TableTooDeep { .. }
                | FrameError::HeadersTooLarge { .. },
            ) => assert!(buffer.len() < before, "a refused frame was not consumed"),
            // The stream is out of step; a connection closes here.
            Err(_) => break,
        }
    }
});

/// Encodes an accepted frame again, decodes that, and checks that encoding
/// the result gives the same bytes: whatever the broker accepts it can also
/// send, in a form it would accept.
fn re_encode(decoder: &FrameDecoder, frame: &Frame, frame_max_bytes: u32) {
    let mut encoder = FrameEncoder::new();
    match frame {
        Frame::Method(channel, method) => encoder.method(*channel, method),
        Frame::Header {
            channel,
            properties,
            ..
        } => encoder.content(*channel, properties, &[], frame_max_bytes),
        _ => return,
    }
    let first = encoder.bytes().to_vec();
    let mut buffer = BytesMut::from(&first[..]);
    let again = match decoder.decode(&mut buffer) {
        Ok(Some(again)) => again,
        other => panic!("{frame:?} re-encoded as {first:?} decodes as {other:?}"),
    };
    assert!(buffer.is_empty(), "re-encoding left bytes over");
    encoder.clear();
    match &again {
        Frame::Method(channel, method) => encoder.method(*channel, method),
        Frame::Header {
            channel,
            properties,
            ..
        } => encoder.content(*channel, properties, &[], frame_max_bytes),
        other => panic!("{frame:?} came back as {other:?}"),
    }
    assert_eq!(encoder.bytes(), &first[..], "encoding is not stable");
}
