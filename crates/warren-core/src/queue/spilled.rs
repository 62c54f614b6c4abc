//! A waiting message's index entry as a spill file holds it (see
//! `warren_store::spill`): the message without its body, in 56 bytes.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | sequence |
//! | 8 | 1 | where the body is: 1 a Publish record, 2 a Paged record |
//! | 9 | 1 | redelivered (0 or 1) |
//! | 10 | 1 | priority level |
//! | 11 | 1 | zero |
//! | 12 | 4 | returns |
//! | 16 | 8 | the record's segment |
//! | 24 | 4 | the record's offset |
//! | 28 | 4 | the record's length |
//! | 32 | 8 | expiry (`Expiry`'s word) |
//! | 40 | 8 | arrival, ms since the epoch |
//! | 48 | 4 | body bytes |
//! | 52 | 4 | zero |
//!
//! All integers little-endian. Spill files live only as long as the
//! process, so this layout may change between versions.

use warren_store::{Location, Sequence, SpillEntry};

use super::{Expiry, MessageMeta, QueuedMessage, Stored};

const PUBLISHED: u8 = 1;
const PAGED: u8 = 2;

impl SpillEntry for QueuedMessage {
    const ENCODED_BYTES: usize = 56;

    fn can_spill(&self) -> bool {
        self.message.is_none() && self.stored.location().is_some()
    }

    fn encode(&self, sequence: Sequence, out: &mut Vec<u8>) {
        let (kind, location) = match self.stored {
            Stored::Published(location) => (PUBLISHED, location),
            Stored::Paged(location) => (PAGED, location),
            Stored::Nowhere => unreachable!("only a stored message is spilled"),
        };
        out.extend_from_slice(&sequence.to_le_bytes());
        out.extend_from_slice(&[kind, u8::from(self.redelivered), self.meta.priority, 0]);
        out.extend_from_slice(&self.meta.returns.to_le_bytes());
        out.extend_from_slice(&location.segment.to_le_bytes());
        out.extend_from_slice(&location.offset.to_le_bytes());
        out.extend_from_slice(&location.length.to_le_bytes());
        out.extend_from_slice(&self.meta.expires.word().to_le_bytes());
        out.extend_from_slice(&self.meta.arrived_ms.to_le_bytes());
        out.extend_from_slice(&self.body_bytes.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
    }

    fn decode(bytes: &[u8]) -> Option<(Sequence, Self)> {
        let bytes: &[u8; 56] = bytes.try_into().ok()?;
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let location = Location {
            segment: u64_at(16),
            offset: u32_at(24),
            length: u32_at(28),
        };
        let stored = match bytes[8] {
            PUBLISHED => Stored::Published(location),
            PAGED => Stored::Paged(location),
            _ => return None,
        };
        let redelivered = match bytes[9] {
            0 => false,
            1 => true,
            _ => return None,
        };
        Some((
            u64_at(0),
            QueuedMessage {
                message: None,
                stored,
                redelivered,
                meta: MessageMeta {
                    priority: bytes[10],
                    expires: Expiry::from_word(u64_at(32)),
                    returns: u32_at(12),
                    arrived_ms: u64_at(40),
                },
                body_bytes: u32_at(48),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_comes_back_as_it_was_spilled() {
        let entry = QueuedMessage {
            message: None,
            stored: Stored::Paged(Location {
                segment: 1 << 40,
                offset: 123_456,
                length: 789,
            }),
            redelivered: true,
            meta: MessageMeta {
                priority: 7,
                expires: Expiry::at(1_700_000_000_123),
                returns: 3,
                arrived_ms: 1_699_999_999_999,
            },
            body_bytes: 700,
        };
        let mut bytes = Vec::new();
        entry.encode(42, &mut bytes);
        assert_eq!(bytes.len(), QueuedMessage::ENCODED_BYTES);
        let (sequence, back) = QueuedMessage::decode(&bytes).expect("decodes");
        assert_eq!(sequence, 42);
        assert_eq!(back.stored, entry.stored);
        assert_eq!(back.meta, entry.meta);
        assert!(back.redelivered);
        assert_eq!(back.body_bytes, 700);
        for unknown in [Expiry::NEVER, Expiry::UNKNOWN] {
            let mut bytes = Vec::new();
            QueuedMessage {
                meta: MessageMeta {
                    expires: unknown,
                    ..entry.meta
                },
                ..entry.clone()
            }
            .encode(1, &mut bytes);
            assert_eq!(
                QueuedMessage::decode(&bytes).unwrap().1.meta.expires,
                unknown
            );
        }
    }

    #[test]
    fn bytes_this_version_did_not_write_are_refused() {
        assert!(QueuedMessage::decode(&[0; 56]).is_none());
        assert!(QueuedMessage::decode(&[1; 55]).is_none());
    }
}
