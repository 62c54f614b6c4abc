//! SASL PLAIN and AMQPLAIN, checked against the configured users.

use std::net::IpAddr;

use amq_protocol::types::{AMQPValue, FieldTable, parsing::parse_field_table};

use crate::config::User;

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

pub const MECHANISMS: &str = "PLAIN AMQPLAIN";

/// Returns the authenticated user's name.
pub fn authenticate(
    users: &[User],
    mechanism: &str,
    response: &[u8],
    peer: IpAddr,
) -> Result<String, AuthError> {
    let (name, password) = match mechanism {
        "PLAIN" => parse_plain(response)?,
        "AMQPLAIN" => parse_amqplain(response)?,
        other => return Err(AuthError::UnknownMechanism(other.to_owned())),
    };
    check_password(users, mechanism, &name, &password, peer)?;
    Ok(name)
}

/// Checks a user's password and where they connect from; `mechanism` only
/// names the way the password came, for the error (HTTP basic auth passes
/// "PLAIN").
pub fn check_password<'a>(
    users: &'a [User],
    mechanism: &str,
    name: &str,
    password: &str,
    peer: IpAddr,
) -> Result<&'a User, AuthError> {
    let refused = || AuthError::Refused {
        mechanism: mechanism.to_owned(),
        user: name.to_owned(),
    };
    let user = users
        .iter()
        .find(|user| user.name == name)
        .ok_or_else(refused)?;
    if !constant_time_eq(user.password.as_bytes(), password.as_bytes()) {
        return Err(refused());
    }
    if user.loopback_only && !peer.is_loopback() && !is_mapped_loopback(peer) {
        return Err(AuthError::LoopbackOnly(name.to_owned()));
    }
    Ok(user)
}

fn is_mapped_loopback(peer: IpAddr) -> bool {
    match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        IpAddr::V4(_) => false,
    }
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

/// Compares passwords without an early exit, so response time does not
/// reveal how much of a guess was right.
fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    let mut difference = left.len() ^ right.len();
    for (index, byte) in left.iter().enumerate() {
        difference |= (byte ^ right.get(index).copied().unwrap_or(0)) as usize;
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::auth::{Credentials, SASLMechanism};
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn users() -> Vec<User> {
        vec![
            User {
                name: "guest".into(),
                password: "guest".into(),
                loopback_only: true,
            },
            User {
                name: "alice".into(),
                password: "secret".into(),
                loopback_only: false,
            },
        ]
    }

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const REMOTE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

    #[test]
    fn plain_and_amqplain_accept_the_right_password() {
        let alice = Credentials::new("alice".into(), "secret".into());
        for mechanism in [SASLMechanism::Plain, SASLMechanism::AMQPlain] {
            let response = alice.sasl_auth_string(mechanism);
            let name = mechanism.to_string();
            assert_eq!(
                authenticate(&users(), &name, response.as_bytes(), REMOTE),
                Ok("alice".into())
            );
        }
    }

    #[test]
    fn wrong_password_is_refused() {
        let result = authenticate(&users(), "PLAIN", b"\0alice\0nope", LOOPBACK);
        assert!(matches!(result, Err(AuthError::Refused { .. })));
        let result = authenticate(&users(), "PLAIN", b"\0mallory\0secret", LOOPBACK);
        assert!(matches!(result, Err(AuthError::Refused { .. })));
    }

    #[test]
    fn guest_only_from_loopback() {
        assert_eq!(
            authenticate(&users(), "PLAIN", b"\0guest\0guest", LOOPBACK),
            Ok("guest".into())
        );
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(
            authenticate(&users(), "PLAIN", b"\0guest\0guest", v6),
            Ok("guest".into())
        );
        let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        assert_eq!(
            authenticate(&users(), "PLAIN", b"\0guest\0guest", mapped),
            Ok("guest".into())
        );
        assert_eq!(
            authenticate(&users(), "PLAIN", b"\0guest\0guest", REMOTE),
            Err(AuthError::LoopbackOnly("guest".into()))
        );
    }

    #[test]
    fn malformed_and_unknown() {
        assert_eq!(
            authenticate(&users(), "PLAIN", b"guest", LOOPBACK),
            Err(AuthError::MalformedResponse("PLAIN"))
        );
        assert_eq!(
            authenticate(&users(), "EXTERNAL", b"", LOOPBACK),
            Err(AuthError::UnknownMechanism("EXTERNAL".into()))
        );
    }
}
