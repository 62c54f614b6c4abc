//! Policies and operator policies in the running broker: setting and
//! clearing them (durably, in the topology journal), and applying them
//! live to every queue and exchange of their vhost, as RabbitMQ does when a
//! policy changes.

use std::sync::Arc;

use warren_store::TopologyChange;

use super::Broker;
use super::dead_letter::dead_letter;
use super::effect::Outbox;
use crate::QueueId;
use crate::error::BrokerResult;
use crate::policy::{Policy, PolicyError, PolicyKind, PolicySpec, VhostPolicies};
use crate::queue::Queue;
use crate::queue::dead_letter::{DeadLetter, DeathReason};

impl Broker {
    /// Adds or replaces a policy and applies it at once; true when it is
    /// new. Durable, like the topology: the caller holds its answer for
    /// `take_topology_ticket`.
    pub fn set_policy(&mut self, spec: PolicySpec, out: &mut Outbox) -> BrokerResult<bool> {
        if !self.vhosts.contains_key(&spec.vhost) {
            return Err(PolicyError::NoVhost(spec.vhost).into());
        }
        let policy = Policy::new(spec)?;
        let vhost = policy.vhost.clone();
        let entry = policy.durable_entry();
        let (replaced, changed) = self
            .policies
            .entry(vhost.clone())
            .or_default()
            .insert(policy)?;
        if changed {
            if let Some(old) = &replaced {
                self.topology_changes
                    .push(TopologyChange::Removed(old.durable_entry().into()));
            }
            self.topology_changes
                .push(TopologyChange::Added(entry.into()));
            self.apply_policies(&vhost, out);
        }
        self.sync_topology()?;
        Ok(replaced.is_none())
    }

    /// Removes a policy and lifts what it set at once; false when there
    /// was none of that name.
    pub fn clear_policy(
        &mut self,
        kind: PolicyKind,
        vhost: &str,
        name: &str,
        out: &mut Outbox,
    ) -> BrokerResult<bool> {
        let Some(removed) = self
            .policies
            .get_mut(vhost)
            .and_then(|policies| policies.remove(kind, name))
        else {
            return Ok(false);
        };
        self.topology_changes
            .push(TopologyChange::Removed(removed.durable_entry().into()));
        self.apply_policies(vhost, out);
        self.sync_topology()?;
        Ok(true)
    }

    /// The policies of `kind`, of one vhost or of all, sorted by vhost and
    /// name.
    pub fn policies(&self, kind: PolicyKind, vhost: Option<&str>) -> Vec<Arc<Policy>> {
        let mut listed: Vec<Arc<Policy>> = self
            .policies
            .iter()
            .filter(|(name, _)| vhost.is_none_or(|vhost| vhost == name.as_str()))
            .flat_map(|(_, policies)| policies.iter(kind).cloned())
            .collect();
        listed.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        listed
    }

    pub fn policy(&self, kind: PolicyKind, vhost: &str, name: &str) -> Option<Arc<Policy>> {
        self.policies
            .get(vhost)
            .and_then(|policies| policies.get(kind, name))
            .cloned()
    }

    /// Forgets a deleted vhost's policies, journal entries included.
    pub(crate) fn drop_policies(&mut self, vhost: &str) {
        if let Some(policies) = self.policies.remove(vhost) {
            for policy in policies.all() {
                self.topology_changes
                    .push(TopologyChange::Removed(policy.durable_entry().into()));
            }
        }
    }

    /// Recovery: a policy the journal held. One that no longer validates
    /// is dropped with a warning rather than refusing to start.
    pub(crate) fn restore_policy(&mut self, spec: PolicySpec) {
        let (vhost, name) = (spec.vhost.clone(), spec.name.clone());
        let restored = Policy::new(spec).and_then(|policy| {
            self.policies
                .entry(vhost.clone())
                .or_default()
                .insert(policy)
        });
        if let Err(error) = restored {
            tracing::warn!(%vhost, policy = %name, %error, "dropping a recovered policy");
        }
    }

    /// Applies the vhost's policies to every queue and exchange in it
    /// whose policies changed.
    pub(crate) fn apply_policies(&mut self, vhost_name: &str, out: &mut Outbox) {
        let now_ms = self.now_ms();
        let empty = VhostPolicies::default();
        let policies = self.policies.get(vhost_name).unwrap_or(&empty);
        let Some(vhost) = self.vhosts.get_mut(vhost_name) else {
            return;
        };
        for exchange in vhost.exchanges.values_mut() {
            exchange.policy = policies.for_exchange(exchange.name.as_str());
        }
        let mut reschedule: Vec<(QueueId, u64)> = Vec::new();
        for id in vhost.queues.values() {
            let Some(queue) = self.queues.get(id) else {
                continue;
            };
            let mut queue = queue.lock();
            let applied = policies.for_queue(queue.name.as_str(), queue.args.queue_type);
            if applied == queue.policy {
                continue;
            }
            if queue.set_policy(applied, now_ms)
                && let Some(expires_ms) = queue.args.expires_ms
            {
                reschedule.push((*id, now_ms.saturating_add(expires_ms)));
            }
            let log = self.store.as_ref().map(|store| &store.log);
            drop_over_length(&mut queue, log, now_ms, out);
        }
        for (id, at) in reschedule {
            self.schedule(id, at);
        }
    }

    /// Applies the policies of every vhost: once recovery has read the
    /// whole journal, whose policies may come after the queues they match.
    pub(crate) fn apply_all_policies(&mut self, out: &mut Outbox) {
        let vhosts: Vec<String> = self.vhosts.keys().cloned().collect();
        for vhost in vhosts {
            self.apply_policies(&vhost, out);
        }
    }

    /// What applies to a queue about to be declared.
    pub(crate) fn policy_for_new_queue(&self, queue: &mut Queue) {
        if let Some(policies) = self.policies.get(&queue.vhost) {
            let applied = policies.for_queue(queue.name.as_str(), queue.args.queue_type);
            queue.set_policy(applied, queue.last_used_ms);
        }
    }
}

/// Drops messages from the head of a queue over its length limits, as a
/// drop-head queue does when a message arrives and RabbitMQ does when a
/// policy lowers a limit; reject-publish queues keep what they hold.
pub(crate) fn drop_over_length(
    queue: &mut Queue,
    log: Option<&warren_store::MessageLog>,
    now_ms: u64,
    out: &mut Outbox,
) {
    if queue.args.overflow != crate::queue::arguments::Overflow::DropHead {
        return;
    }
    while queue.over_length() {
        let Some(dropped) = queue.pop_loaded(log, now_ms) else {
            break;
        };
        let dead = DeadLetter {
            queue: queue.id,
            message: dropped.message,
            stored: dropped.stored,
            reason: DeathReason::Maxlen,
        };
        dead_letter(queue, dead, out);
    }
}
