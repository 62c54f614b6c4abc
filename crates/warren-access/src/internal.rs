//! The broker's own identity, for the clients it runs itself: the model
//! workers inside `warren serve` reach the broker over loopback AMQP like
//! any other client, but they must keep working whatever operators do to
//! the users they manage (deleting guest, narrowing its permissions).
//!
//! So they log in as [`INTERNAL_USER`], a name no operator can create,
//! with a secret drawn when the broker starts and never written anywhere.
//! The user is not stored, listed or manageable; it may log in only from a
//! loopback address, has no tags (no management API), and holds full
//! permissions in every vhost that exists, as RabbitMQ's own internal
//! connections (shovels, federation) do.

use rand_core::{OsRng, RngCore};
use subtle::ConstantTimeEq;

/// The reserved name of the broker's own identity.
pub const INTERNAL_USER: &str = "warren-internal";

/// Random bytes in the secret (hex-encoded, so it fits in a URL as is).
const SECRET_BYTES: usize = 32;

pub(crate) struct InternalIdentity {
    secret: String,
}

impl InternalIdentity {
    pub(crate) fn generate() -> Self {
        let mut bytes = [0u8; SECRET_BYTES];
        OsRng.fill_bytes(&mut bytes);
        let secret = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        Self { secret }
    }

    pub(crate) fn secret(&self) -> &str {
        &self.secret
    }

    pub(crate) fn verify(&self, password: &str) -> bool {
        bool::from(self.secret.as_bytes().ct_eq(password.as_bytes()))
    }
}
