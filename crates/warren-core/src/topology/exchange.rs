//! Exchanges, their bindings, and the four routing algorithms.

use amq_protocol::types::{AMQPValue, FieldTable, ShortString};

use std::sync::atomic::{AtomicU64, Ordering};

use warren_store::TopologyChange;

use super::bindings::Bindings;
use crate::QueueId;
use crate::durable::entry;
use crate::error::{BrokerError, BrokerResult};
use crate::field::as_integer;
use crate::stats::ExchangeCounts;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "direct" => Some(Self::Direct),
            "fanout" => Some(Self::Fanout),
            "topic" => Some(Self::Topic),
            "headers" => Some(Self::Headers),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
        }
    }
}

/// Where a binding sends what matches it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Queue(QueueId),
    Exchange(ShortString),
}

#[derive(Debug, Clone)]
pub struct Binding {
    pub destination: Destination,
    pub routing_key: ShortString,
    pub arguments: FieldTable,
    /// The binding's entry in the durable topology, when both of its ends
    /// survive a restart; fixed when it is made, and what the journal is
    /// told when it goes.
    pub persisted: Option<Box<[u8]>>,
}

/// Two bindings are the same binding when they join the same ends with the
/// same key and arguments.
impl PartialEq for Binding {
    fn eq(&self, other: &Self) -> bool {
        self.destination == other.destination
            && self.routing_key == other.routing_key
            && self.arguments == other.arguments
    }
}

#[derive(Debug)]
pub struct Exchange {
    pub name: ShortString,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    /// The policies that apply to it.
    pub policy: ExchangePolicy,
    /// Bindings whose source is this exchange, indexed for its kind.
    pub bindings: Bindings,
    /// Counted through the shared reference routing already holds:
    /// publishers on several threads route through one exchange at once.
    pub counts: PublishCounters,
}

/// The policies applying to an exchange: their names for the management
/// API, and the one setting a policy can give an exchange.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExchangePolicy {
    pub policy: Option<String>,
    pub operator_policy: Option<String>,
    pub alternate_exchange: Option<ShortString>,
}

/// An exchange's `ExchangeCounts`, counted without a lock.
#[derive(Debug, Default)]
pub struct PublishCounters {
    published_in: AtomicU64,
    published_out: AtomicU64,
}

impl PublishCounters {
    pub fn get(&self) -> ExchangeCounts {
        ExchangeCounts {
            published_in: self.published_in.load(Ordering::Relaxed),
            published_out: self.published_out.load(Ordering::Relaxed),
        }
    }
}

impl Exchange {
    /// Counts one message published to this exchange.
    pub fn count_publish(&self, routed: bool) {
        self.counts.published_in.fetch_add(1, Ordering::Relaxed);
        if routed {
            self.counts.published_out.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Where messages this exchange cannot route go instead: its
    /// `alternate-exchange` argument, or else its policy's, as in RabbitMQ.
    pub fn alternate_exchange(&self) -> Option<&str> {
        match self.arguments.inner().get("alternate-exchange") {
            Some(AMQPValue::LongString(name)) => std::str::from_utf8(name.as_bytes()).ok(),
            Some(AMQPValue::ShortString(name)) => Some(name.as_str()),
            _ => self
                .policy
                .alternate_exchange
                .as_ref()
                .map(ShortString::as_str),
        }
    }

    /// Its entry in the durable topology; None for a transient exchange
    /// and for the built-in ones, which every vhost has anyway.
    pub(crate) fn durable_entry(&self, vhost: &str) -> Option<Vec<u8>> {
        let name = self.name.as_str();
        let builtin = name.is_empty() || name.starts_with("amq.");
        (self.durable && !builtin).then(|| {
            entry::exchange_entry(
                vhost,
                name,
                self.kind.name(),
                self.auto_delete,
                self.internal,
                &self.arguments,
            )
        })
    }

    /// What removing it removes from the durable topology: its own entry
    /// and those of its bindings.
    pub(crate) fn durable_removal(&self, vhost: &str) -> Vec<TopologyChange> {
        self.durable_entry(vhost)
            .into_iter()
            .chain(
                self.bindings
                    .iter()
                    .filter_map(|binding| binding.persisted.as_deref().map(<[u8]>::to_vec)),
            )
            .map(TopologyChange::Removed)
            .collect()
    }
}

/// Whether a topic binding pattern matches a routing key. Words are separated
/// by dots; `*` stands for exactly one word and `#` for zero or more words.
/// An empty key has no words, as in RabbitMQ, so `#` matches it and `*` does
/// not.
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    fn words(text: &str) -> Vec<&str> {
        if text.is_empty() {
            Vec::new()
        } else {
            text.split('.').collect()
        }
    }
    let pattern = words(pattern);
    let key = words(routing_key);
    // matches[j] says whether the pattern words seen so far match the first j
    // key words: a dynamic programme over the pattern, linear in key length
    // per pattern word, so hostile patterns cannot make it exponential.
    let mut matches = vec![false; key.len() + 1];
    matches[0] = true;
    for word in &pattern {
        let mut next = vec![false; key.len() + 1];
        match *word {
            "#" => {
                let mut reachable = false;
                for j in 0..=key.len() {
                    reachable |= matches[j];
                    next[j] = reachable;
                }
            }
            "*" => {
                next[1..].copy_from_slice(&matches[..key.len()]);
            }
            literal => {
                for j in 0..key.len() {
                    next[j + 1] = matches[j] && key[j] == literal;
                }
            }
        }
        matches = next;
    }
    matches[key.len()]
}

/// Checks a binding's `x-match` argument when binding to a headers exchange,
/// refusing what RabbitMQ refuses.
pub(crate) fn validate_headers_binding(arguments: &FieldTable) -> BrokerResult<()> {
    let mode = match arguments.inner().get("x-match") {
        None => return Ok(()),
        Some(AMQPValue::LongString(mode)) => String::from_utf8_lossy(mode.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(mode)) => mode.as_str().to_owned(),
        Some(other) => {
            return Err(BrokerError::InvalidMatchType {
                found: format!("{:?}", other.get_type()),
            });
        }
    };
    match mode.as_str() {
        "all" | "any" | "all-with-x" | "any-with-x" => Ok(()),
        _ => Err(BrokerError::InvalidMatchValue(mode.to_string())),
    }
}

/// The headers exchange's rule: `x-match` in the binding says whether all
/// or any of the binding's other arguments must appear in the message
/// headers. Arguments starting with `x-` are ignored unless the mode is
/// `all-with-x` or `any-with-x`. An argument of type void matches on the
/// key's presence alone.
pub fn headers_match(binding_arguments: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let mode: &[u8] = match binding_arguments.inner().get("x-match") {
        Some(AMQPValue::LongString(mode)) => mode.as_bytes(),
        Some(AMQPValue::ShortString(mode)) => mode.as_str().as_bytes(),
        _ => b"all",
    };
    let (want_all, include_x) = match mode {
        b"any" => (false, false),
        b"all-with-x" => (true, true),
        b"any-with-x" => (false, true),
        _ => (true, false),
    };
    static EMPTY: std::sync::LazyLock<FieldTable> = std::sync::LazyLock::new(FieldTable::default);
    let headers = headers.unwrap_or(&EMPTY).inner();
    let mut considered = binding_arguments
        .inner()
        .iter()
        .filter(|(key, _)| key.as_str() != "x-match")
        .filter(|(key, _)| include_x || !key.as_str().starts_with("x-"));
    let matches_one = |(key, expected): (&ShortString, &AMQPValue)| match headers.get(key) {
        None => false,
        Some(_) if *expected == AMQPValue::Void => true,
        Some(actual) => values_equal(actual, expected),
    };
    if want_all {
        considered.all(matches_one)
    } else {
        considered.any(matches_one)
    }
}

/// Header values compare by meaning: a string header matches a string
/// argument whichever of the two string types each used, and integers match
/// across widths.
fn values_equal(left: &AMQPValue, right: &AMQPValue) -> bool {
    if let (Some(left), Some(right)) = (as_text(left), as_text(right)) {
        return left == right;
    }
    if let (Some(left), Some(right)) = (as_integer(left), as_integer(right)) {
        return left == right;
    }
    left == right
}

fn as_text(value: &AMQPValue) -> Option<&[u8]> {
    match value {
        AMQPValue::LongString(text) => Some(text.as_bytes()),
        AMQPValue::ShortString(text) => Some(text.as_str().as_bytes()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_wildcards() {
        assert!(topic_matches("*.orange.*", "quick.orange.rabbit"));
        assert!(!topic_matches("*.orange.*", "quick.orange.new.rabbit"));
        assert!(topic_matches("lazy.#", "lazy"));
        assert!(topic_matches("lazy.#", "lazy.pink.rabbit"));
        assert!(!topic_matches("lazy.#", "lazyx.pink"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#", "a.b.c"));
        assert!(topic_matches("#.a", "a"));
        assert!(topic_matches("a.#.b", "a.b"));
        assert!(topic_matches("a.#.b", "a.x.y.b"));
        assert!(!topic_matches("a.*.b", "a.b"));
        assert!(topic_matches("", ""));
        assert!(!topic_matches("*", ""));
        assert!(!topic_matches("a", ""));
        assert!(topic_matches("#.#", "x"));
        assert!(topic_matches("a..b", "a..b"));
        assert!(topic_matches("a.*.b", "a..b"));
    }

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in entries {
            table.insert((*key).into(), value.clone());
        }
        table
    }

    #[test]
    fn headers_all_and_any() {
        let text = |s: &str| AMQPValue::LongString(s.into());
        let binding_all = table(&[("x-match", text("all")), ("a", text("1")), ("b", text("2"))]);
        let binding_any = table(&[("x-match", text("any")), ("a", text("1")), ("b", text("2"))]);
        let both = table(&[("a", text("1")), ("b", text("2"))]);
        let one = table(&[("a", text("1"))]);
        assert!(headers_match(&binding_all, Some(&both)));
        assert!(!headers_match(&binding_all, Some(&one)));
        assert!(headers_match(&binding_any, Some(&one)));
        assert!(!headers_match(&binding_any, None));
    }

    #[test]
    fn headers_with_x_consider_x_arguments() {
        let text = |s: &str| AMQPValue::LongString(s.into());
        let plain = table(&[("x-match", text("all")), ("x-tenant", text("t1"))]);
        let with_x = table(&[("x-match", text("all-with-x")), ("x-tenant", text("t1"))]);
        let other_tenant = table(&[("x-tenant", text("t2"))]);
        assert!(headers_match(&plain, Some(&other_tenant)));
        assert!(!headers_match(&with_x, Some(&other_tenant)));
        let any_with_x = table(&[("x-match", text("any-with-x")), ("x-tenant", text("t2"))]);
        assert!(headers_match(&any_with_x, Some(&other_tenant)));
    }

    #[test]
    fn header_values_compare_across_integer_widths() {
        assert!(values_equal(
            &AMQPValue::LongInt(5),
            &AMQPValue::ShortShortUInt(5)
        ));
        assert!(values_equal(
            &AMQPValue::ShortString("x".into()),
            &AMQPValue::LongString("x".into())
        ));
    }
}
