//! The topology of each vhost: its exchanges with their bindings, the
//! names of its queues, and routing a message through them to the queues
//! it reaches. It knows queues only by id; what a queue holds is `queue`'s.

pub(crate) mod bindings;
pub(crate) mod exchange;

use std::collections::{HashMap, HashSet};

use amq_protocol::types::{FieldTable, ShortString};
use warren_store::TopologyChange;

use crate::{Message, QueueId};
use bindings::Bindings;
use exchange::{Binding, Destination, Exchange, ExchangeKind};

/// A vhost's exchanges and the names of its queues.
pub(crate) struct VHost {
    pub(crate) name: String,
    pub(crate) exchanges: HashMap<ShortString, Exchange>,
    pub(crate) queues: HashMap<ShortString, QueueId>,
    /// Its `max-queues` limit, under the broker-wide one.
    pub(crate) queues_max: Option<usize>,
}

impl VHost {
    /// A vhost with only the exchanges every vhost has.
    pub(crate) fn new(name: &str) -> Self {
        let exchanges = BUILTIN_EXCHANGES
            .iter()
            .map(|(name, kind)| {
                let exchange = Exchange {
                    name: (*name).into(),
                    kind: *kind,
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    arguments: FieldTable::default(),
                    policy: Default::default(),
                    bindings: Bindings::new(*kind),
                    counts: Default::default(),
                };
                ((*name).into(), exchange)
            })
            .collect();
        VHost {
            name: name.to_owned(),
            exchanges,
            queues: HashMap::new(),
            queues_max: None,
        }
    }
}

const BUILTIN_EXCHANGES: &[(&str, ExchangeKind)] = &[
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
    // Where Warren's model workers announce loads, switches and unloads
    // (warren-http's model_events.rs); RabbitMQ's plugins add exchanges
    // of their own under amq.rabbitmq.* the same way.
    ("amq.warren.model-events", ExchangeKind::Topic),
];

/// Every queue a message reaches from `exchange`, following exchange-to-
/// exchange bindings once each, without duplicates. An exchange whose own
/// bindings match nothing passes the message to its `alternate-exchange`,
/// as RabbitMQ does.
pub(crate) fn route(vhost: &VHost, exchange: &Exchange, message: &Message) -> Vec<QueueId> {
    let routing_key = message.routing_key.as_str();
    let mut queues = DistinctQueues::default();
    if exchange.name.as_str().is_empty() {
        if let Some(id) = vhost.queues.get(routing_key) {
            queues.add(*id);
        }
        return queues.list;
    }
    let headers = message.properties.headers().as_ref();
    let mut visited: Vec<&str> = vec![exchange.name.as_str()];
    let mut pending: Vec<&Exchange> = vec![exchange];
    fn follow<'a>(
        vhost: &'a VHost,
        name: &str,
        visited: &mut Vec<&'a str>,
        pending: &mut Vec<&'a Exchange>,
    ) {
        if !visited.contains(&name)
            && let Some(next) = vhost.exchanges.get(name)
        {
            visited.push(next.name.as_str());
            pending.push(next);
        }
    }
    while let Some(exchange) = pending.pop() {
        let mut matched_any = false;
        exchange
            .bindings
            .route(routing_key, headers, |destination| {
                matched_any = true;
                match destination {
                    Destination::Queue(id) => queues.add(*id),
                    Destination::Exchange(name) => {
                        follow(vhost, name.as_str(), &mut visited, &mut pending)
                    }
                }
            });
        if !matched_any && let Some(alternate) = exchange.alternate_exchange() {
            follow(vhost, alternate, &mut visited, &mut pending);
        }
    }
    queues.list
}

/// Queues a message reaches, each once, in the order first reached: a
/// list while it is short (most messages reach one queue, and a list
/// allocates nothing more), with a set beside it once it is long, so that a
/// fan-out to thousands of queues is not quadratic.
#[derive(Default)]
struct DistinctQueues {
    list: Vec<QueueId>,
    set: Option<HashSet<QueueId>>,
}

impl DistinctQueues {
    const LIST_SCAN_MAX: usize = 16;

    fn add(&mut self, id: QueueId) {
        let new = match &mut self.set {
            Some(set) => set.insert(id),
            None if self.list.len() < Self::LIST_SCAN_MAX => !self.list.contains(&id),
            None => {
                let mut set: HashSet<QueueId> = self.list.iter().copied().collect();
                let new = set.insert(id);
                self.set = Some(set);
                new
            }
        };
        if new {
            self.list.push(id);
        }
    }
}

pub(crate) fn add_binding(
    vhost: &mut VHost,
    source: &str,
    binding: Binding,
    changes: &mut Vec<TopologyChange>,
) {
    let exchange = vhost
        .exchanges
        .get_mut(source)
        .expect("caller checked the source");
    let entry = binding.persisted.clone();
    if exchange.bindings.insert(binding)
        && let Some(entry) = entry
    {
        changes.push(TopologyChange::Added(entry.into()));
    }
}

pub(crate) fn remove_binding(
    vhost: &mut VHost,
    source: &str,
    binding: &Binding,
    changes: &mut Vec<TopologyChange>,
) {
    let Some(exchange) = vhost.exchanges.get_mut(source) else {
        return;
    };
    let removed = exchange.bindings.remove(binding);
    forget_bindings(vhost, source, removed, changes);
}

fn remove_bindings_to(
    vhost: &mut VHost,
    source: &str,
    destination: &Destination,
    changes: &mut Vec<TopologyChange>,
) {
    let Some(exchange) = vhost.exchanges.get_mut(source) else {
        return;
    };
    let removed = exchange.bindings.remove_to(destination);
    forget_bindings(vhost, source, removed, changes);
}

/// Notes the removal of the source's bindings that were durable; an
/// auto-delete source that lost its last binding goes with them.
fn forget_bindings(
    vhost: &mut VHost,
    source: &str,
    removed: impl IntoIterator<Item = Binding>,
    changes: &mut Vec<TopologyChange>,
) {
    let mut any = false;
    for binding in removed {
        any = true;
        if let Some(entry) = binding.persisted {
            changes.push(TopologyChange::Removed(entry.into()));
        }
    }
    if any {
        delete_if_auto(vhost, source, changes);
    }
}

/// An auto-delete exchange goes when its last binding does.
pub(crate) fn delete_if_auto(vhost: &mut VHost, name: &str, changes: &mut Vec<TopologyChange>) {
    if vhost
        .exchanges
        .get(name)
        .is_some_and(|exchange| exchange.auto_delete && exchange.bindings.is_empty())
    {
        remove_exchange(vhost, name, changes);
    }
}

/// Removes an exchange with its own bindings and every binding that points
/// at it.
pub(crate) fn remove_exchange(vhost: &mut VHost, name: &str, changes: &mut Vec<TopologyChange>) {
    let Some(exchange) = vhost.exchanges.remove(name) else {
        return;
    };
    changes.extend(exchange.durable_removal(&vhost.name));
    remove_bindings_leading_to(vhost, &Destination::Exchange(name.into()), changes);
}

/// Removes every binding, from any exchange of the vhost, that leads to
/// `destination` (a queue or an exchange going away).
pub(crate) fn remove_bindings_leading_to(
    vhost: &mut VHost,
    destination: &Destination,
    changes: &mut Vec<TopologyChange>,
) {
    let sources: Vec<ShortString> = vhost
        .exchanges
        .values()
        .filter(|exchange| exchange.bindings.leads_to(destination))
        .map(|exchange| exchange.name.clone())
        .collect();
    for source in sources {
        remove_bindings_to(vhost, source.as_str(), destination, changes);
    }
}
