//! Policies and operator policies, as RabbitMQ has them: a name, a regular
//! expression matched against queue and exchange names in one vhost, what
//! kind of object it applies to, a priority, and a definition of settings.
//! Of the policies that match an object, the one with the highest
//! priority applies, and so does the highest operator policy; the two
//! definitions are merged (`PolicyArguments::merge_operator`) and the
//! queue combines the result with its own arguments
//! (`QueueArguments::with_policy`).
//!
//! This module validates definitions and chooses which policies apply; the
//! broker (`broker/policies.rs`) keeps them durable and applies them.

use std::collections::BTreeMap;
use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use regex::{Regex, RegexBuilder};

use crate::field::as_integer;
use crate::queue::arguments::{
    AppliedPolicy, DURATION_MAX_MS, Overflow, PolicyArguments, QueueType, as_text,
};
use crate::topology::exchange::ExchangePolicy;

/// The most policies (of each kind) one vhost holds, so that matching a
/// queue against them stays cheap and the journal small.
pub const POLICIES_PER_VHOST_MAX: usize = 1024;

/// The longest pattern a policy may have, in bytes.
pub const POLICY_PATTERN_MAX_BYTES: usize = 4096;

/// The most memory a compiled pattern may take: a pattern is matched
/// against every queue name in its vhost whenever policies change.
const PATTERN_SIZE_LIMIT_BYTES: usize = 1 << 20;

/// A user's policy, or an operator policy: the second kind takes only
/// limits, and lowers what users set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    Policy,
    OperatorPolicy,
}

impl PolicyKind {
    /// The name RabbitMQ's definitions give it (a runtime parameter's
    /// component).
    pub fn component(self) -> &'static str {
        match self {
            PolicyKind::Policy => "policy",
            PolicyKind::OperatorPolicy => "operator_policy",
        }
    }
}

/// Which objects a policy applies to (`apply-to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApplyTo {
    #[default]
    All,
    Exchanges,
    Queues,
    ClassicQueues,
    QuorumQueues,
    /// Accepted so that RabbitMQ's definitions import; Warren has no
    /// streams, so it matches nothing.
    Streams,
}

impl ApplyTo {
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        Ok(match text {
            "all" => ApplyTo::All,
            "exchanges" => ApplyTo::Exchanges,
            "queues" => ApplyTo::Queues,
            "classic_queues" => ApplyTo::ClassicQueues,
            "quorum_queues" => ApplyTo::QuorumQueues,
            "streams" => ApplyTo::Streams,
            other => return Err(PolicyError::ApplyTo(other.to_owned())),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ApplyTo::All => "all",
            ApplyTo::Exchanges => "exchanges",
            ApplyTo::Queues => "queues",
            ApplyTo::ClassicQueues => "classic_queues",
            ApplyTo::QuorumQueues => "quorum_queues",
            ApplyTo::Streams => "streams",
        }
    }

    fn queues_of(self, queue_type: QueueType) -> bool {
        match self {
            ApplyTo::All | ApplyTo::Queues => true,
            ApplyTo::ClassicQueues => queue_type == QueueType::Classic,
            ApplyTo::QuorumQueues => queue_type == QueueType::Quorum,
            ApplyTo::Exchanges | ApplyTo::Streams => false,
        }
    }

    fn exchanges(self) -> bool {
        matches!(self, ApplyTo::All | ApplyTo::Exchanges)
    }
}

/// Why a policy was refused; the texts follow RabbitMQ's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("no policy provided")]
    EmptyDefinition,
    #[error("[{}] are not recognised policy settings", .0.join(", "))]
    UnknownKeys(Vec<String>),
    #[error("{value} is not a valid {what}")]
    InvalidValue { value: String, what: &'static str },
    #[error("pattern should be regular expression but is invalid: {0}")]
    Pattern(String),
    #[error(
        "apply-to '{0}' unrecognised; should be one of: 'queues', 'classic_queues', \
         'quorum_queues', 'streams', 'exchanges', or 'all'"
    )]
    ApplyTo(String),
    #[error("no vhost '{0}'")]
    NoVhost(String),
    #[error("a policy name must be 1 to 255 bytes")]
    Name,
    #[error("vhost '{vhost}' has {max} {kind}s already")]
    TooMany {
        vhost: String,
        kind: &'static str,
        max: usize,
    },
}

/// A validated policy.
#[derive(Debug)]
pub struct Policy {
    pub kind: PolicyKind,
    pub vhost: String,
    pub name: String,
    pub pattern: String,
    regex: Regex,
    pub apply_to: ApplyTo,
    pub priority: i64,
    /// The definition as given, every key (those Warren ignores included).
    pub definition: FieldTable,
    /// The queue settings the definition holds.
    arguments: PolicyArguments,
    alternate_exchange: Option<ShortString>,
}

/// What an operator gives to make a policy.
#[derive(Debug, Clone)]
pub struct PolicySpec {
    pub kind: PolicyKind,
    pub vhost: String,
    pub name: String,
    pub pattern: String,
    pub apply_to: ApplyTo,
    pub priority: i64,
    pub definition: FieldTable,
}

impl PolicySpec {
    /// The policy a durable entry's value describes; None if it lacks a
    /// part.
    pub(crate) fn from_entry(
        vhost: &str,
        name: &str,
        operator: bool,
        value: &FieldTable,
    ) -> Option<Self> {
        let table = value.inner();
        Some(Self {
            kind: if operator {
                PolicyKind::OperatorPolicy
            } else {
                PolicyKind::Policy
            },
            vhost: vhost.to_owned(),
            name: name.to_owned(),
            pattern: as_text(table.get("pattern")?)?,
            apply_to: ApplyTo::parse(&as_text(table.get("apply-to")?)?).ok()?,
            priority: i64::try_from(as_integer(table.get("priority")?)?).ok()?,
            definition: match table.get("definition")? {
                AMQPValue::FieldTable(definition) => definition.clone(),
                _ => return None,
            },
        })
    }
}

impl Policy {
    pub fn new(spec: PolicySpec) -> Result<Self, PolicyError> {
        if spec.name.is_empty() || spec.name.len() > 255 {
            return Err(PolicyError::Name);
        }
        if spec.pattern.len() > POLICY_PATTERN_MAX_BYTES {
            return Err(PolicyError::Pattern(format!(
                "longer than {POLICY_PATTERN_MAX_BYTES} bytes"
            )));
        }
        let regex = RegexBuilder::new(&spec.pattern)
            .size_limit(PATTERN_SIZE_LIMIT_BYTES)
            .build()
            .map_err(|error| PolicyError::Pattern(error.to_string()))?;
        let (arguments, alternate_exchange) = parse_definition(spec.kind, &spec.definition)?;
        Ok(Self {
            kind: spec.kind,
            vhost: spec.vhost,
            name: spec.name,
            pattern: spec.pattern,
            regex,
            apply_to: spec.apply_to,
            priority: spec.priority,
            definition: spec.definition,
            arguments,
            alternate_exchange,
        })
    }

    fn matches_queue(&self, name: &str, queue_type: QueueType) -> bool {
        self.apply_to.queues_of(queue_type) && self.regex.is_match(name)
    }

    fn matches_exchange(&self, name: &str) -> bool {
        self.apply_to.exchanges() && self.regex.is_match(name)
    }

    /// Its entry in the durable topology.
    pub(crate) fn durable_entry(&self) -> Box<[u8]> {
        let mut value = FieldTable::default();
        value.insert(
            "pattern".into(),
            AMQPValue::LongString(self.pattern.as_str().into()),
        );
        value.insert(
            "apply-to".into(),
            AMQPValue::LongString(self.apply_to.as_str().into()),
        );
        value.insert("priority".into(), AMQPValue::LongLongInt(self.priority));
        value.insert(
            "definition".into(),
            AMQPValue::FieldTable(self.definition.clone()),
        );
        crate::durable::entry::policy_entry(
            &self.vhost,
            &self.name,
            self.kind == PolicyKind::OperatorPolicy,
            &value,
        )
    }

    /// The same policy, as far as anything it applies to can tell.
    fn same_as(&self, other: &Policy) -> bool {
        self.pattern == other.pattern
            && self.apply_to == other.apply_to
            && self.priority == other.priority
            && self.definition == other.definition
    }
}

/// One vhost's policies of both kinds, by name.
#[derive(Debug, Default)]
pub struct VhostPolicies {
    policies: BTreeMap<String, Arc<Policy>>,
    operator_policies: BTreeMap<String, Arc<Policy>>,
}

impl VhostPolicies {
    fn of(&self, kind: PolicyKind) -> &BTreeMap<String, Arc<Policy>> {
        match kind {
            PolicyKind::Policy => &self.policies,
            PolicyKind::OperatorPolicy => &self.operator_policies,
        }
    }

    fn of_mut(&mut self, kind: PolicyKind) -> &mut BTreeMap<String, Arc<Policy>> {
        match kind {
            PolicyKind::Policy => &mut self.policies,
            PolicyKind::OperatorPolicy => &mut self.operator_policies,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.operator_policies.is_empty()
    }

    pub fn get(&self, kind: PolicyKind, name: &str) -> Option<&Arc<Policy>> {
        self.of(kind).get(name)
    }

    pub fn iter(&self, kind: PolicyKind) -> impl Iterator<Item = &Arc<Policy>> {
        self.of(kind).values()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.policies
            .values()
            .chain(self.operator_policies.values())
    }

    /// Adds or replaces a policy; returns the one it replaced, and whether
    /// anything changed.
    pub(crate) fn insert(
        &mut self,
        policy: Policy,
    ) -> Result<(Option<Arc<Policy>>, bool), PolicyError> {
        let kind = policy.kind;
        let map = self.of_mut(kind);
        if let Some(existing) = map.get(&policy.name)
            && existing.same_as(&policy)
        {
            return Ok((Some(Arc::clone(existing)), false));
        }
        if !map.contains_key(&policy.name) && map.len() >= POLICIES_PER_VHOST_MAX {
            return Err(PolicyError::TooMany {
                vhost: policy.vhost.clone(),
                kind: kind.component(),
                max: POLICIES_PER_VHOST_MAX,
            });
        }
        let replaced = map.insert(policy.name.clone(), Arc::new(policy));
        Ok((replaced, true))
    }

    pub(crate) fn remove(&mut self, kind: PolicyKind, name: &str) -> Option<Arc<Policy>> {
        self.of_mut(kind).remove(name)
    }

    /// The policy of `kind` that applies: the highest priority among those
    /// matching, the first by name among equals (RabbitMQ leaves that
    /// order unspecified).
    fn best(&self, kind: PolicyKind, matches: impl Fn(&Policy) -> bool) -> Option<&Arc<Policy>> {
        let mut best: Option<&Arc<Policy>> = None;
        for policy in self.of(kind).values() {
            if matches(policy) && best.is_none_or(|best| policy.priority > best.priority) {
                best = Some(policy);
            }
        }
        best
    }

    /// What applies to the queue `name` of `queue_type`.
    pub fn for_queue(&self, name: &str, queue_type: QueueType) -> AppliedPolicy {
        let matches = |policy: &Policy| policy.matches_queue(name, queue_type);
        let policy = self.best(PolicyKind::Policy, matches);
        let operator = self.best(PolicyKind::OperatorPolicy, matches);
        let arguments = match (policy, operator) {
            (Some(policy), Some(operator)) => policy.arguments.merge_operator(&operator.arguments),
            (Some(one), None) | (None, Some(one)) => one.arguments.clone(),
            (None, None) => PolicyArguments::default(),
        };
        AppliedPolicy {
            policy: policy.map(|policy| policy.name.clone()),
            operator_policy: operator.map(|policy| policy.name.clone()),
            definition: merge_definitions(
                policy.map(|policy| &policy.definition),
                operator.map(|policy| &policy.definition),
            ),
            arguments,
        }
    }

    /// What applies to the exchange `name`.
    pub fn for_exchange(&self, name: &str) -> ExchangePolicy {
        let matches = |policy: &Policy| policy.matches_exchange(name);
        let policy = self.best(PolicyKind::Policy, matches);
        let operator = self.best(PolicyKind::OperatorPolicy, matches);
        ExchangePolicy {
            policy: policy.map(|policy| policy.name.clone()),
            operator_policy: operator.map(|policy| policy.name.clone()),
            alternate_exchange: policy.and_then(|policy| policy.alternate_exchange.clone()),
        }
    }
}

/// RabbitMQ's `effective_policy_definition`: the keys of both, and for a
/// key both set, the lower limit (the operator's value for the others).
fn merge_definitions(policy: Option<&FieldTable>, operator: Option<&FieldTable>) -> FieldTable {
    let mut merged = policy.cloned().unwrap_or_default();
    let Some(operator) = operator else {
        return merged;
    };
    for (key, value) in operator.inner() {
        let chosen = match (merged.inner().get(key.as_str()), key.as_str()) {
            (Some(existing), "delivery-limit") => match (as_integer(existing), as_integer(value)) {
                (Some(a), Some(b)) if a < 0 || b < 0 => {
                    if a >= b {
                        existing.clone()
                    } else {
                        value.clone()
                    }
                }
                (Some(a), Some(b)) if a <= b => existing.clone(),
                _ => value.clone(),
            },
            (Some(existing), _) => match (as_integer(existing), as_integer(value)) {
                (Some(a), Some(b)) if a <= b => existing.clone(),
                _ => value.clone(),
            },
            (None, _) => value.clone(),
        };
        merged.insert(key.clone(), chosen);
    }
    merged
}

/// Keys RabbitMQ accepts in a policy that do nothing on a single Warren
/// node (mirroring, placement, streams, in-memory limits of a backlog that
/// already lives on disk, federation): accepted and shown, so that
/// definitions exported from RabbitMQ 3.x and 4.x import unchanged.
const IGNORED_KEYS: &[&str] = &[
    "queue-mode",
    "queue-version",
    "max-in-memory-length",
    "max-in-memory-bytes",
    "dead-letter-strategy",
    "queue-leader-locator",
    "queue-master-locator",
    "initial-cluster-size",
    "target-group-size",
    "max-age",
    "stream-max-segment-size-bytes",
    "stream-filter-size-bytes",
    "consumer-disconnected-timeout",
    "ha-mode",
    "ha-params",
    "ha-sync-mode",
    "ha-sync-batch-size",
    "ha-promote-on-shutdown",
    "ha-promote-on-failure",
    "federation-upstream",
    "federation-upstream-set",
];

/// The keys an operator policy may set (RabbitMQ's operator policy
/// validators): limits only.
const OPERATOR_KEYS: &[&str] = &[
    "expires",
    "message-ttl",
    "max-length",
    "max-length-bytes",
    "max-in-memory-length",
    "max-in-memory-bytes",
    "delivery-limit",
    "queue-version",
    "overflow",
    "target-group-size",
];

fn parse_definition(
    kind: PolicyKind,
    definition: &FieldTable,
) -> Result<(PolicyArguments, Option<ShortString>), PolicyError> {
    let table = definition.inner();
    if table.is_empty() {
        return Err(PolicyError::EmptyDefinition);
    }
    let unknown: Vec<String> = table
        .keys()
        .map(|key| key.as_str())
        .filter(|key| match kind {
            PolicyKind::Policy => !APPLIED_KEYS.contains(key) && !IGNORED_KEYS.contains(key),
            PolicyKind::OperatorPolicy => !OPERATOR_KEYS.contains(key),
        })
        .map(str::to_owned)
        .collect();
    if !unknown.is_empty() {
        return Err(PolicyError::UnknownKeys(unknown));
    }
    let invalid = |value: &AMQPValue, what: &'static str| PolicyError::InvalidValue {
        value: describe(value),
        what,
    };
    let integer = |key: &str, minimum: i128, maximum: i128, what: &'static str| {
        table
            .get(key)
            .map(|value| match as_integer(value) {
                Some(number) if (minimum..=maximum).contains(&number) => Ok(number),
                _ => Err(invalid(value, what)),
            })
            .transpose()
    };
    let name = |key: &str, what: &'static str| {
        table
            .get(key)
            .map(|value| match as_text(value) {
                Some(text) if text.len() <= 255 => Ok(ShortString::from(text)),
                _ => Err(invalid(value, what)),
            })
            .transpose()
    };
    let duration_max = DURATION_MAX_MS as i128;
    let length_max = i64::MAX as i128;
    let overflow = table
        .get("overflow")
        .map(|value| match as_text(value).as_deref() {
            Some("drop-head") => Ok(Overflow::DropHead),
            Some("reject-publish") => Ok(Overflow::RejectPublish),
            Some("reject-publish-dlx") => Ok(Overflow::RejectPublishDlx),
            _ => Err(invalid(value, "overflow value")),
        })
        .transpose()?;
    if let Some(value) = table.get("queue-mode")
        && !matches!(as_text(value).as_deref(), Some("default" | "lazy"))
    {
        return Err(invalid(value, "queue-mode value"));
    }
    let arguments = PolicyArguments {
        message_ttl_ms: integer("message-ttl", 0, duration_max, "message TTL")?.map(|n| n as u64),
        expires_ms: integer("expires", 1, duration_max, "queue expiry")?.map(|n| n as u64),
        dead_letter_exchange: name("dead-letter-exchange", "dead letter exchange name")?,
        dead_letter_routing_key: name("dead-letter-routing-key", "dead letter routing key")?,
        max_length: integer("max-length", 0, length_max, "maximum length")?.map(|n| n as u64),
        max_length_bytes: integer("max-length-bytes", 0, length_max, "maximum length in bytes")?
            .map(|n| n as u64),
        overflow,
        delivery_limit: integer(
            "delivery-limit",
            i64::MIN as i128,
            length_max,
            "delivery limit",
        )?
        .map(|n| n as i64),
        consumer_timeout_ms: integer("consumer-timeout", 1, duration_max, "consumer timeout")?
            .map(|n| n as u64),
    };
    let alternate_exchange = name("alternate-exchange", "alternate exchange name")?;
    Ok((arguments, alternate_exchange))
}

/// The keys Warren applies.
const APPLIED_KEYS: &[&str] = &[
    "message-ttl",
    "expires",
    "max-length",
    "max-length-bytes",
    "overflow",
    "dead-letter-exchange",
    "dead-letter-routing-key",
    "delivery-limit",
    "consumer-timeout",
    "alternate-exchange",
];

/// A value as an error message shows it.
fn describe(value: &AMQPValue) -> String {
    match (as_integer(value), as_text(value)) {
        (Some(number), _) => number.to_string(),
        (_, Some(text)) => format!("\"{text}\""),
        _ => format!("{value:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in entries {
            table.insert((*key).into(), value.clone());
        }
        table
    }

    fn policy(
        kind: PolicyKind,
        name: &str,
        pattern: &str,
        apply_to: ApplyTo,
        priority: i64,
        entries: &[(&str, AMQPValue)],
    ) -> Result<Policy, PolicyError> {
        Policy::new(PolicySpec {
            kind,
            vhost: "/".to_owned(),
            name: name.to_owned(),
            pattern: pattern.to_owned(),
            apply_to,
            priority,
            definition: definition(entries),
        })
    }

    fn long(n: i64) -> AMQPValue {
        AMQPValue::LongLongInt(n)
    }

    #[test]
    fn the_highest_priority_applies_and_the_operator_policy_lowers_limits() {
        let mut policies = VhostPolicies::default();
        for made in [
            policy(
                PolicyKind::Policy,
                "low",
                "^orders",
                ApplyTo::All,
                0,
                &[("max-length", long(5)), ("message-ttl", long(1000))],
            ),
            policy(
                PolicyKind::Policy,
                "high",
                "^ord",
                ApplyTo::Queues,
                10,
                &[("max-length", long(100)), ("message-ttl", long(60_000))],
            ),
            policy(
                PolicyKind::OperatorPolicy,
                "cap",
                ".*",
                ApplyTo::Queues,
                0,
                &[("max-length", long(10))],
            ),
        ] {
            policies.insert(made.unwrap()).unwrap();
        }
        let applied = policies.for_queue("orders", QueueType::Classic);
        assert_eq!(applied.policy.as_deref(), Some("high"));
        assert_eq!(applied.operator_policy.as_deref(), Some("cap"));
        assert_eq!(applied.arguments.max_length, Some(10));
        assert_eq!(applied.arguments.message_ttl_ms, Some(60_000));
        assert_eq!(
            applied.definition.inner().get("max-length"),
            Some(&long(10)),
            "the effective definition shows the lower value"
        );
        let unmatched = policies.for_queue("other", QueueType::Classic);
        assert_eq!(unmatched.policy, None);
        assert_eq!(unmatched.operator_policy.as_deref(), Some("cap"));
        assert_eq!(
            policies.for_exchange("orders").policy.as_deref(),
            Some("low")
        );
    }

    #[test]
    fn apply_to_picks_the_kind_of_object() {
        let mut policies = VhostPolicies::default();
        let only_quorum = policy(
            PolicyKind::Policy,
            "q",
            ".",
            ApplyTo::QuorumQueues,
            0,
            &[("delivery-limit", long(3))],
        );
        policies.insert(only_quorum.unwrap()).unwrap();
        assert_eq!(
            policies.for_queue("a", QueueType::Quorum).policy.as_deref(),
            Some("q")
        );
        assert_eq!(policies.for_queue("a", QueueType::Classic).policy, None);
        assert_eq!(policies.for_exchange("a").policy, None);
    }

    #[test]
    fn definitions_are_validated_with_rabbitmq_texts() {
        let refused = |kind, entries: &[(&str, AMQPValue)]| {
            policy(kind, "p", ".*", ApplyTo::All, 0, entries)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(refused(PolicyKind::Policy, &[]), "no policy provided");
        assert_eq!(
            refused(
                PolicyKind::Policy,
                &[("max-length", AMQPValue::LongString("ten".into()))]
            ),
            "\"ten\" is not a valid maximum length"
        );
        assert!(
            refused(PolicyKind::Policy, &[("no-such-key", long(1))])
                .contains("are not recognised policy settings")
        );
        assert!(
            refused(
                PolicyKind::OperatorPolicy,
                &[("dead-letter-exchange", AMQPValue::LongString("x".into()))]
            )
            .contains("are not recognised policy settings"),
            "operator policies take limits only"
        );
        assert!(
            policy(
                PolicyKind::Policy,
                "p",
                "[",
                ApplyTo::All,
                0,
                &[("expires", long(5))]
            )
            .unwrap_err()
            .to_string()
            .starts_with("pattern should be regular expression")
        );
        assert!(ApplyTo::parse("bogus").is_err());
        let ignored = policy(
            PolicyKind::Policy,
            "ha",
            ".*",
            ApplyTo::All,
            0,
            &[("ha-mode", AMQPValue::LongString("all".into()))],
        );
        assert!(ignored.is_ok(), "RabbitMQ 3.x mirroring keys import");
    }

    #[test]
    fn replacing_a_policy_with_itself_changes_nothing() {
        let mut policies = VhostPolicies::default();
        let make = || {
            policy(
                PolicyKind::Policy,
                "p",
                ".*",
                ApplyTo::All,
                0,
                &[("expires", long(5))],
            )
        };
        assert!(policies.insert(make().unwrap()).unwrap().1);
        assert!(!policies.insert(make().unwrap()).unwrap().1);
    }
}
