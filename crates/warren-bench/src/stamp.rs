//! The latency stamp at the front of every message body: the send time and a
//! per-producer sequence number.
//!
//! The send time is wall-clock nanoseconds since the Unix epoch rather than a
//! monotonic `Instant`, because producers and consumers are separate tasks (and
//! could be separate processes on one host); the Unix epoch is the one clock
//! they all share. Both fields are big-endian `u64`s so a packet capture reads
//! naturally.

use std::time::{SystemTime, UNIX_EPOCH};

/// Bytes the stamp occupies at the start of a body; `--size` may not go below.
pub const STAMP_SIZE_BYTES: usize = 16;

/// What a producer writes into the front of each body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Wall-clock send time, nanoseconds since the Unix epoch.
    pub sent_unix_ns: u64,
    /// Position of this message in its producer's sequence, from 0.
    pub sequence: u64,
}

impl Stamp {
    /// Writes the stamp into the first [`STAMP_SIZE_BYTES`] of `body`.
    ///
    /// # Panics
    /// If `body` is shorter than the stamp: the CLI rejects such sizes, so a
    /// short body here is a bug.
    pub fn encode_into(&self, body: &mut [u8]) {
        assert!(
            body.len() >= STAMP_SIZE_BYTES,
            "body of {} bytes cannot hold a {STAMP_SIZE_BYTES}-byte stamp",
            body.len()
        );
        body[0..8].copy_from_slice(&self.sent_unix_ns.to_be_bytes());
        body[8..16].copy_from_slice(&self.sequence.to_be_bytes());
    }

    /// Reads a stamp from the front of `body`; `None` when the body is too
    /// short to carry one (a message this tool did not publish).
    pub fn decode(body: &[u8]) -> Option<Self> {
        let sent: [u8; 8] = body.get(0..8)?.try_into().ok()?;
        let sequence: [u8; 8] = body.get(8..16)?.try_into().ok()?;
        Some(Self {
            sent_unix_ns: u64::from_be_bytes(sent),
            sequence: u64::from_be_bytes(sequence),
        })
    }

    /// Nanoseconds from the send time to `received_unix_ns`, or 0 when the
    /// receive time is earlier (the wall clock stepped backwards mid-run).
    pub fn latency_ns(&self, received_unix_ns: u64) -> u64 {
        received_unix_ns.saturating_sub(self.sent_unix_ns)
    }
}

/// The wall clock now, in nanoseconds since the Unix epoch; 0 if the clock is
/// set before 1970, which only skews latencies rather than failing the run.
pub fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_a_padded_body() {
        let stamp = Stamp {
            sent_unix_ns: 1_732_000_000_123_456_789,
            sequence: 42,
        };
        let mut body = vec![0xAA; 1024];
        stamp.encode_into(&mut body);
        assert_eq!(Stamp::decode(&body), Some(stamp));
        // The padding past the stamp is left as it was.
        assert!(body[STAMP_SIZE_BYTES..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn layout_is_big_endian_time_then_sequence() {
        let stamp = Stamp {
            sent_unix_ns: 0x0102_0304_0506_0708,
            sequence: 0x1112_1314_1516_1718,
        };
        let mut body = [0u8; STAMP_SIZE_BYTES];
        stamp.encode_into(&mut body);
        assert_eq!(
            body,
            [
                1, 2, 3, 4, 5, 6, 7, 8, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18
            ]
        );
    }

    #[test]
    fn short_bodies_carry_no_stamp() {
        assert_eq!(Stamp::decode(&[]), None);
        assert_eq!(Stamp::decode(&[0u8; STAMP_SIZE_BYTES - 1]), None);
        assert!(Stamp::decode(&[0u8; STAMP_SIZE_BYTES]).is_some());
    }

    #[test]
    #[should_panic(expected = "cannot hold")]
    fn encoding_into_a_short_body_is_a_bug() {
        let stamp = Stamp {
            sent_unix_ns: 1,
            sequence: 1,
        };
        stamp.encode_into(&mut [0u8; 8]);
    }

    #[test]
    fn latency_is_receive_minus_send_and_never_negative() {
        let stamp = Stamp {
            sent_unix_ns: 1_000,
            sequence: 0,
        };
        assert_eq!(stamp.latency_ns(1_500), 500);
        assert_eq!(stamp.latency_ns(900), 0);
    }

    #[test]
    fn the_clock_is_past_2020() {
        // 2020-01-01T00:00:00Z; catches a seconds-for-nanoseconds mix-up.
        assert!(now_unix_ns() > 1_577_836_800_000_000_000);
    }
}
