//! The entries of the durable topology: one per durable exchange, queue,
//! binding and policy, as the topology journal keeps them (docs/storage-format.md
//! gives the layout). This module knows the bytes only; the exchange and
//! the queue say when they have an entry, and the broker rebuilds itself
//! from the decoded ones.

use amq_protocol::types::{FieldTable, ShortString};

use super::codec::{Reader, put_short, put_table};

const ENTRY_EXCHANGE: u8 = 1;
const ENTRY_QUEUE: u8 = 2;
const ENTRY_BINDING: u8 = 3;
const ENTRY_POLICY: u8 = 4;
const POLICY_KIND_USER: u8 = 0;
const POLICY_KIND_OPERATOR: u8 = 1;
const DESTINATION_QUEUE: u8 = 0;
const DESTINATION_EXCHANGE: u8 = 1;

const FLAG_AUTO_DELETE: u8 = 1;
const FLAG_INTERNAL: u8 = 2;

/// Where a durable binding leads, by name, as its entry records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DurableDestination<'a> {
    Queue(&'a str),
    Exchange(&'a str),
}

/// A decoded entry.
#[derive(Debug, PartialEq)]
pub(crate) enum TopologyEntry {
    Exchange {
        vhost: ShortString,
        name: ShortString,
        /// The exchange type's name, as `exchange.declare` gives it.
        kind: ShortString,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    },
    Queue {
        vhost: ShortString,
        name: ShortString,
        /// The queue's id, which its messages in the log are filed under.
        id: u64,
        auto_delete: bool,
        arguments: FieldTable,
    },
    Binding {
        vhost: ShortString,
        source: ShortString,
        /// True for a binding to an exchange, false for one to a queue.
        to_exchange: bool,
        destination: ShortString,
        routing_key: ShortString,
        arguments: FieldTable,
    },
    Policy {
        vhost: ShortString,
        name: ShortString,
        /// An operator policy rather than a user's.
        operator: bool,
        /// RabbitMQ's runtime parameter value: `pattern`, `apply-to`,
        /// `priority` and `definition`.
        value: FieldTable,
    },
}

/// The entry of a policy; `value` holds its pattern, apply-to, priority
/// and definition as RabbitMQ's runtime parameter does.
pub(crate) fn policy_entry(
    vhost: &str,
    name: &str,
    operator: bool,
    value: &FieldTable,
) -> Box<[u8]> {
    let mut entry = vec![ENTRY_POLICY];
    put_short(&mut entry, vhost);
    put_short(&mut entry, name);
    entry.push(if operator {
        POLICY_KIND_OPERATOR
    } else {
        POLICY_KIND_USER
    });
    put_table(&mut entry, value);
    entry.into()
}

pub(crate) fn exchange_entry(
    vhost: &str,
    name: &str,
    kind: &str,
    auto_delete: bool,
    internal: bool,
    arguments: &FieldTable,
) -> Vec<u8> {
    let mut entry = vec![ENTRY_EXCHANGE];
    put_short(&mut entry, vhost);
    put_short(&mut entry, name);
    put_short(&mut entry, kind);
    entry.push(flag(auto_delete, FLAG_AUTO_DELETE) | flag(internal, FLAG_INTERNAL));
    put_table(&mut entry, arguments);
    entry
}

pub(crate) fn queue_entry(
    vhost: &str,
    name: &str,
    id: u64,
    auto_delete: bool,
    arguments: &FieldTable,
) -> Box<[u8]> {
    let mut entry = vec![ENTRY_QUEUE];
    put_short(&mut entry, vhost);
    put_short(&mut entry, name);
    entry.extend_from_slice(&id.to_le_bytes());
    entry.push(flag(auto_delete, FLAG_AUTO_DELETE));
    put_table(&mut entry, arguments);
    entry.into()
}

/// The entry of a binding between two durable ends.
pub(crate) fn binding_entry(
    vhost: &str,
    source: &str,
    destination: DurableDestination<'_>,
    routing_key: &str,
    arguments: &FieldTable,
) -> Box<[u8]> {
    let (kind, name) = match destination {
        DurableDestination::Queue(name) => (DESTINATION_QUEUE, name),
        DurableDestination::Exchange(name) => (DESTINATION_EXCHANGE, name),
    };
    let mut entry = vec![ENTRY_BINDING];
    put_short(&mut entry, vhost);
    put_short(&mut entry, source);
    entry.push(kind);
    put_short(&mut entry, name);
    put_short(&mut entry, routing_key);
    put_table(&mut entry, arguments);
    entry.into()
}

/// Decodes an entry; None for bytes that are not one.
pub(crate) fn decode(entry: &[u8]) -> Option<TopologyEntry> {
    let mut reader = Reader::new(entry);
    match reader.u8()? {
        ENTRY_EXCHANGE => {
            let vhost = reader.short()?;
            let name = reader.short()?;
            let kind = reader.short()?;
            let flags = reader.u8()?;
            Some(TopologyEntry::Exchange {
                vhost,
                name,
                kind,
                auto_delete: flags & FLAG_AUTO_DELETE != 0,
                internal: flags & FLAG_INTERNAL != 0,
                arguments: reader.table()?,
            })
        }
        ENTRY_QUEUE => {
            let vhost = reader.short()?;
            let name = reader.short()?;
            let id = reader.u64()?;
            let flags = reader.u8()?;
            Some(TopologyEntry::Queue {
                vhost,
                name,
                id,
                auto_delete: flags & FLAG_AUTO_DELETE != 0,
                arguments: reader.table()?,
            })
        }
        ENTRY_BINDING => {
            let vhost = reader.short()?;
            let source = reader.short()?;
            let to_exchange = match reader.u8()? {
                DESTINATION_QUEUE => false,
                DESTINATION_EXCHANGE => true,
                _ => return None,
            };
            Some(TopologyEntry::Binding {
                vhost,
                source,
                to_exchange,
                destination: reader.short()?,
                routing_key: reader.short()?,
                arguments: reader.table()?,
            })
        }
        ENTRY_POLICY => {
            let vhost = reader.short()?;
            let name = reader.short()?;
            let operator = match reader.u8()? {
                POLICY_KIND_USER => false,
                POLICY_KIND_OPERATOR => true,
                _ => return None,
            };
            Some(TopologyEntry::Policy {
                vhost,
                name,
                operator,
                value: reader.table()?,
            })
        }
        _ => None,
    }
}

fn flag(set: bool, bit: u8) -> u8 {
    if set { bit } else { 0 }
}

#[cfg(test)]
mod tests {
    use amq_protocol::types::AMQPValue;

    use super::*;

    fn arguments() -> FieldTable {
        let mut table = FieldTable::default();
        table.insert("x-max-length".into(), AMQPValue::LongLongInt(10));
        table
    }

    #[test]
    fn each_kind_of_entry_decodes_to_what_was_encoded() {
        let exchange = exchange_entry("/", "logs", "topic", true, false, &arguments());
        assert_eq!(
            decode(&exchange),
            Some(TopologyEntry::Exchange {
                vhost: "/".into(),
                name: "logs".into(),
                kind: "topic".into(),
                auto_delete: true,
                internal: false,
                arguments: arguments(),
            })
        );
        let queue = queue_entry("v", "jobs", 42, false, &arguments());
        assert_eq!(
            decode(&queue),
            Some(TopologyEntry::Queue {
                vhost: "v".into(),
                name: "jobs".into(),
                id: 42,
                auto_delete: false,
                arguments: arguments(),
            })
        );
        let binding = binding_entry(
            "/",
            "logs",
            DurableDestination::Exchange("errors"),
            "*.error",
            &FieldTable::default(),
        );
        assert_eq!(
            decode(&binding),
            Some(TopologyEntry::Binding {
                vhost: "/".into(),
                source: "logs".into(),
                to_exchange: true,
                destination: "errors".into(),
                routing_key: "*.error".into(),
                arguments: FieldTable::default(),
            })
        );
        let policy = policy_entry("/", "ttl", true, &arguments());
        assert_eq!(
            decode(&policy),
            Some(TopologyEntry::Policy {
                vhost: "/".into(),
                name: "ttl".into(),
                operator: true,
                value: arguments(),
            })
        );
    }

    #[test]
    fn truncated_or_unknown_entries_do_not_decode() {
        let queue = queue_entry("/", "jobs", 7, true, &FieldTable::default());
        assert_eq!(decode(&queue[..queue.len() - 1]), None);
        assert_eq!(decode(&[9, 0]), None);
        assert_eq!(decode(&[]), None);
    }
}
