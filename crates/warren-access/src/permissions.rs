//! A user's rights in one vhost: three regular expressions, one for each
//! kind of operation, matched against the name of the queue or exchange an
//! operation touches, with RabbitMQ's meaning.
//!
//! * `configure`: creating, deleting or redefining a resource (declare, delete);
//! * `write`: putting messages into it (publish to an exchange, binding a
//!   queue or exchange as a destination);
//! * `read`: taking messages out of it (consume, get, purge, binding from an
//!   exchange as a source).
//!
//! As in RabbitMQ, a pattern matches anywhere in the name unless anchored,
//! the empty pattern means `^$` (nothing), and the default exchange is
//! matched under the name `amq.default`.

use regex::Regex;

/// Which of the three rights an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Configure,
    Write,
    Read,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Configure => "configure",
            Access::Write => "write",
            Access::Read => "read",
        }
    }
}

/// What kind of thing a name belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    Queue,
    Exchange,
}

impl ResourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Queue => "queue",
            ResourceKind::Exchange => "exchange",
        }
    }
}

/// A queue or exchange, by name, as permission checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource<'a> {
    pub kind: ResourceKind,
    pub name: &'a str,
}

impl<'a> Resource<'a> {
    pub fn queue(name: &'a str) -> Self {
        Self {
            kind: ResourceKind::Queue,
            name,
        }
    }

    pub fn exchange(name: &'a str) -> Self {
        Self {
            kind: ResourceKind::Exchange,
            name,
        }
    }

    /// The name patterns are matched against: the default exchange's empty
    /// name reads as `amq.default`, as in RabbitMQ.
    pub fn matched_name(&self) -> &'a str {
        match (self.kind, self.name) {
            (ResourceKind::Exchange, "") => "amq.default",
            (_, name) => name,
        }
    }
}

/// One compiled permission pattern, keeping the text it came from.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    regex: Regex,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {access} pattern '{pattern}': {reason}")]
pub struct PatternError {
    pub access: &'static str,
    pub pattern: String,
    pub reason: String,
}

/// Longest pattern accepted, and the compiled size allowed for it: a
/// pattern is operator input, but a pathological one must not cost the
/// broker unbounded memory or time on every publish.
pub const PATTERN_LENGTH_MAX_BYTES: usize = 4096;
const PATTERN_COMPILED_SIZE_MAX_BYTES: usize = 1024 * 1024;

impl Pattern {
    pub fn new(access: Access, source: &str) -> Result<Self, PatternError> {
        let error = |reason: String| PatternError {
            access: access.as_str(),
            pattern: source.to_owned(),
            reason,
        };
        if source.len() > PATTERN_LENGTH_MAX_BYTES {
            return Err(error(format!(
                "longer than {PATTERN_LENGTH_MAX_BYTES} bytes"
            )));
        }
        let effective = if source.is_empty() { "^$" } else { source };
        let regex = regex::RegexBuilder::new(effective)
            .size_limit(PATTERN_COMPILED_SIZE_MAX_BYTES)
            .build()
            .map_err(|e| error(e.to_string()))?;
        Ok(Self {
            source: source.to_owned(),
            regex,
        })
    }

    /// The pattern as the operator wrote it.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, name: &str) -> bool {
        self.regex.is_match(name)
    }
}

/// A user's three patterns in one vhost.
#[derive(Debug, Clone)]
pub struct Permissions {
    pub configure: Pattern,
    pub write: Pattern,
    pub read: Pattern,
}

impl Permissions {
    pub fn new(configure: &str, write: &str, read: &str) -> Result<Self, PatternError> {
        Ok(Self {
            configure: Pattern::new(Access::Configure, configure)?,
            write: Pattern::new(Access::Write, write)?,
            read: Pattern::new(Access::Read, read)?,
        })
    }

    /// `.*` for all three: what RabbitMQ's default user has in `/`.
    pub fn full() -> Self {
        Self::new(".*", ".*", ".*").expect("'.*' compiles")
    }

    pub fn pattern(&self, access: Access) -> &Pattern {
        match access {
            Access::Configure => &self.configure,
            Access::Write => &self.write,
            Access::Read => &self.read,
        }
    }

    pub fn allows(&self, access: Access, resource: Resource<'_>) -> bool {
        self.pattern(access).matches(resource.matched_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_unanchored_unless_anchored() {
        let permissions = Permissions::new("^app\\.", "jobs", "").unwrap();
        assert!(permissions.allows(Access::Configure, Resource::queue("app.jobs")));
        assert!(!permissions.allows(Access::Configure, Resource::queue("my.app.jobs")));
        assert!(permissions.allows(Access::Write, Resource::exchange("all-jobs-here")));
        assert!(!permissions.allows(Access::Write, Resource::exchange("work")));
    }

    #[test]
    fn the_empty_pattern_allows_nothing() {
        let permissions = Permissions::new("", "", "").unwrap();
        for access in [Access::Configure, Access::Write, Access::Read] {
            assert!(!permissions.allows(access, Resource::queue("q")));
            assert!(!permissions.allows(access, Resource::exchange("")));
        }
    }

    #[test]
    fn the_default_exchange_is_amq_default() {
        let permissions = Permissions::new(".*", "^amq\\.default$", ".*").unwrap();
        assert!(permissions.allows(Access::Write, Resource::exchange("")));
        assert!(!permissions.allows(Access::Write, Resource::exchange("amq.direct")));
        // A queue with an empty name is not the default exchange.
        assert!(!permissions.allows(Access::Write, Resource::queue("")));
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        let error = Permissions::new("(", ".*", ".*").unwrap_err();
        assert_eq!(error.access, "configure");
        assert_eq!(error.pattern, "(");
        let long = "a".repeat(PATTERN_LENGTH_MAX_BYTES + 1);
        assert!(Permissions::new(".*", &long, ".*").is_err());
    }
}
