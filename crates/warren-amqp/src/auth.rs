//! SASL: PLAIN and AMQPLAIN (a password, checked against the user's
//! Argon2id hash) and EXTERNAL (the name a verified TLS client certificate
//! carries). The checks themselves are `warren-access`'s.

use std::net::IpAddr;

use amq_protocol::types::{AMQPValue, FieldTable, parsing::parse_field_table};
use warren_access::{AccessControl, LoginError, User};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("unknown authentication mechanism '{0}'")]
    UnknownMechanism(String),
    #[error("malformed {0} response")]
    MalformedResponse(&'static str),
    #[error(
        "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
    )]
    Refused { mechanism: String, user: String },
    #[error("user '{0}' can only connect via localhost")]
    LoopbackOnly(String),
}

/// Mechanisms offered without TLS client certificates, in RabbitMQ's order.
pub const MECHANISMS: &str = "PLAIN AMQPLAIN";
/// Mechanisms offered to a client that presented a verified certificate.
/// EXTERNAL comes last, so that a client which takes the first mechanism
/// it knows keeps using its password unless it asks for EXTERNAL.
pub const MECHANISMS_WITH_EXTERNAL: &str = "PLAIN AMQPLAIN EXTERNAL";

/// Logs a user in. `certificate_name` is the common name of the client's
/// verified TLS certificate, if it presented one. Slow (Argon2) for a
/// password not seen before: call it off the async executor.
pub fn authenticate(
    access: &AccessControl,
    mechanism: &str,
    response: &[u8],
    peer: IpAddr,
    certificate_name: Option<&str>,
) -> Result<User, AuthError> {
    let login = match mechanism {
        "PLAIN" | "AMQPLAIN" => {
            let (name, password) = if mechanism == "PLAIN" {
                parse_plain(response)?
            } else {
                parse_amqplain(response)?
            };
            access.login_with_password(&name, &password, peer)
        }
        "EXTERNAL" => {
            let name = certificate_name.ok_or_else(|| AuthError::Refused {
                mechanism: mechanism.to_owned(),
                user: String::new(),
            })?;
            access.login_external(name, peer)
        }
        other => return Err(AuthError::UnknownMechanism(other.to_owned())),
    };
    login.map_err(|error| match error {
        LoginError::Refused { user } => AuthError::Refused {
            mechanism: mechanism.to_owned(),
            user,
        },
        LoginError::LoopbackOnly { user } => AuthError::LoopbackOnly(user),
    })
}

/// "\0user\0password", optionally with an authorization identity first.
fn parse_plain(response: &[u8]) -> Result<(String, String), AuthError> {
    let malformed = AuthError::MalformedResponse("PLAIN");
    let mut parts = response.split(|byte| *byte == 0);
    let (_authzid, user, password) = match (parts.next(), parts.next(), parts.next(), parts.next())
    {
        (Some(authzid), Some(user), Some(password), None) => (authzid, user, password),
        _ => return Err(malformed),
    };
    let text = |bytes: &[u8]| {
        String::from_utf8(bytes.to_vec()).map_err(|_| AuthError::MalformedResponse("PLAIN"))
    };
    Ok((text(user)?, text(password)?))
}

/// A field table without its length prefix, holding LOGIN and PASSWORD.
fn parse_amqplain(response: &[u8]) -> Result<(String, String), AuthError> {
    let malformed = || AuthError::MalformedResponse("AMQPLAIN");
    let mut framed = Vec::with_capacity(response.len() + 4);
    framed.extend_from_slice(&(response.len() as u32).to_be_bytes());
    framed.extend_from_slice(response);
    let table: FieldTable = match parse_field_table(&framed[..]) {
        Ok((&[], table)) => table,
        _ => return Err(malformed()),
    };
    let text = |key: &str| match table.inner().get(key) {
        Some(AMQPValue::LongString(value)) => String::from_utf8(value.as_bytes().to_vec()).ok(),
        Some(AMQPValue::ShortString(value)) => Some(value.to_string()),
        _ => None,
    };
    Ok((
        text("LOGIN").ok_or_else(malformed)?,
        text("PASSWORD").ok_or_else(malformed)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::auth::{Credentials, SASLMechanism};
    use std::net::Ipv4Addr;
    use warren_access::{PasswordChange, PasswordHash, Tags};

    use crate::config::{default_definitions, default_loopback_users};

    fn access() -> AccessControl {
        let access = AccessControl::in_memory(default_definitions(), default_loopback_users());
        let hash = PasswordHash::generate("secret").unwrap();
        access
            .put_user("alice", PasswordChange::Set(hash), Tags::default())
            .unwrap();
        access
    }

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const REMOTE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

    #[test]
    fn plain_and_amqplain_accept_the_right_password() {
        let access = access();
        let alice = Credentials::new("alice".into(), "secret".into());
        for mechanism in [SASLMechanism::Plain, SASLMechanism::AMQPlain] {
            let response = alice.sasl_auth_string(mechanism);
            let name = mechanism.to_string();
            let user = authenticate(&access, &name, response.as_bytes(), REMOTE, None);
            assert_eq!(user.unwrap().name, "alice");
        }
    }

    #[test]
    fn wrong_password_is_refused() {
        let access = access();
        let result = authenticate(&access, "PLAIN", b"\0alice\0nope", LOOPBACK, None);
        assert!(matches!(result, Err(AuthError::Refused { .. })));
        let result = authenticate(&access, "PLAIN", b"\0mallory\0secret", LOOPBACK, None);
        assert!(matches!(result, Err(AuthError::Refused { .. })));
    }

    #[test]
    fn guest_only_from_loopback() {
        let access = access();
        let guest = |peer| authenticate(&access, "PLAIN", b"\0guest\0guest", peer, None);
        assert!(guest(LOOPBACK).is_ok());
        assert!(guest(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)).is_ok());
        assert!(guest(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped())).is_ok());
        assert_eq!(guest(REMOTE), Err(AuthError::LoopbackOnly("guest".into())));
    }

    #[test]
    fn external_takes_the_certificate_name() {
        let access = access();
        let external = |name| authenticate(&access, "EXTERNAL", b"", REMOTE, name);
        assert_eq!(external(Some("alice")).unwrap().name, "alice");
        assert!(matches!(
            external(Some("mallory")),
            Err(AuthError::Refused { .. })
        ));
        assert!(matches!(external(None), Err(AuthError::Refused { .. })));
    }

    #[test]
    fn malformed_and_unknown() {
        let access = access();
        assert_eq!(
            authenticate(&access, "PLAIN", b"guest", LOOPBACK, None),
            Err(AuthError::MalformedResponse("PLAIN"))
        );
        assert_eq!(
            authenticate(&access, "CRAM-MD5", b"", LOOPBACK, None),
            Err(AuthError::UnknownMechanism("CRAM-MD5".into()))
        );
    }
}
