//! User tags: what a user may see and do through the management API and
//! dashboard (AMQP ignores them), with RabbitMQ's meanings.

/// The tags RabbitMQ defines; any other string is kept but grants nothing.
pub const KNOWN_TAGS: &[&str] = &[
    "administrator",
    "monitoring",
    "policymaker",
    "management",
    "impersonator",
];

/// Longest tag list a user may carry, and the longest tag.
pub const TAGS_PER_USER_MAX: usize = 32;
pub const TAG_LENGTH_MAX_BYTES: usize = 255;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags(Vec<String>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TagsError {
    #[error("more than {TAGS_PER_USER_MAX} tags")]
    TooMany,
    #[error("tag '{0}' is empty or longer than {TAG_LENGTH_MAX_BYTES} bytes")]
    BadTag(String),
}

impl Tags {
    pub fn new<I, S>(tags: I) -> Result<Self, TagsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list: Vec<String> = Vec::new();
        for tag in tags {
            let tag = tag.as_ref().trim();
            if tag.is_empty() {
                continue;
            }
            if tag.len() > TAG_LENGTH_MAX_BYTES {
                return Err(TagsError::BadTag(tag.to_owned()));
            }
            if !list.iter().any(|existing| existing == tag) {
                list.push(tag.to_owned());
            }
        }
        if list.len() > TAGS_PER_USER_MAX {
            return Err(TagsError::TooMany);
        }
        Ok(Self(list))
    }

    /// RabbitMQ's comma-separated form ("administrator,management").
    pub fn parse_list(text: &str) -> Result<Self, TagsError> {
        Self::new(text.split(','))
    }

    pub fn administrator() -> Self {
        Self(vec!["administrator".to_owned()])
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    fn has(&self, tag: &str) -> bool {
        self.0.iter().any(|own| own == tag)
    }

    /// Manages users, vhosts and permissions, and sees everything.
    pub fn is_administrator(&self) -> bool {
        self.has("administrator")
    }

    /// Sets and clears policies in the vhosts they may use.
    pub fn can_make_policies(&self) -> bool {
        self.is_administrator() || self.has("policymaker")
    }

    /// Sees every vhost's queues and every connection, not only their own.
    pub fn can_monitor(&self) -> bool {
        self.is_administrator() || self.has("monitoring")
    }

    /// May use the management API and dashboard at all; without any of
    /// these tags a user is refused there, as in RabbitMQ.
    pub fn can_manage(&self) -> bool {
        self.can_monitor() || self.has("policymaker") || self.has("management")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_grant_what_rabbitmq_grants() {
        let none = Tags::default();
        assert!(!none.can_manage() && !none.can_monitor() && !none.is_administrator());
        let management = Tags::parse_list("management").unwrap();
        assert!(management.can_manage() && !management.can_monitor());
        let monitoring = Tags::parse_list("monitoring").unwrap();
        assert!(monitoring.can_manage() && monitoring.can_monitor());
        assert!(!monitoring.is_administrator());
        let admin = Tags::administrator();
        assert!(admin.can_manage() && admin.can_monitor() && admin.is_administrator());
        let custom = Tags::parse_list("billing-team").unwrap();
        assert!(!custom.can_manage());
    }

    #[test]
    fn lists_are_trimmed_and_deduplicated() {
        let tags = Tags::parse_list(" management, monitoring,,management ").unwrap();
        assert_eq!(
            tags.iter().collect::<Vec<_>>(),
            ["management", "monitoring"]
        );
        assert_eq!(Tags::parse_list("").unwrap(), Tags::default());
        let many: Vec<String> = (0..=TAGS_PER_USER_MAX).map(|n| format!("t{n}")).collect();
        assert_eq!(Tags::new(&many), Err(TagsError::TooMany));
    }
}
