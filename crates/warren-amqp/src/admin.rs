//! Operator changes that reach past the access control into the running
//! broker: a new vhost gets its exchanges, a deleted vhost loses its queues
//! and its connections, a deleted user loses their connections, a policy
//! applies to the queues it matches at once. The HTTP API (and through it
//! `warren ctl`) makes every such change here.

use std::sync::Arc;

use tracing::info;
use warren_access::{AccessControl, AccessError, PasswordChange, Permissions, Tags};
use warren_core::policy::{PolicyKind, PolicySpec};
use warren_core::{BrokerError, Outbox};

use crate::hub::SharedHub;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("deleting the vhost's queues: {0}")]
    Broker(BrokerError),
    #[error(transparent)]
    Policy(BrokerError),
}

#[derive(Clone)]
pub struct Admin {
    access: Arc<AccessControl>,
    hub: SharedHub,
}

impl Admin {
    pub fn new(access: Arc<AccessControl>, hub: SharedHub) -> Self {
        Self { access, hub }
    }

    pub fn access(&self) -> &Arc<AccessControl> {
        &self.access
    }

    /// True when the vhost is new.
    pub fn add_vhost(&self, name: &str) -> Result<bool, AdminError> {
        let created = self.access.add_vhost(name)?;
        self.hub.lock().broker.add_vhost(name);
        if created {
            info!(vhost = %name, "vhost created");
        }
        Ok(created)
    }

    /// Deletes the vhost's queues and messages first, then the vhost: a
    /// crash between the two leaves an empty vhost, never queues in a vhost
    /// nobody can open.
    pub fn delete_vhost(&self, name: &str) -> Result<(), AdminError> {
        if !self.access.vhost_exists(name) {
            return Err(AccessError::VhostNotFound(name.to_owned()).into());
        }
        let durable_wait = {
            let mut hub = self.hub.lock();
            let reason = format!("vhost '{name}' is deleted");
            let closed = hub.close_connections_where(|info| info.vhost == name, &reason);
            let mut outbox = Outbox::default();
            let deleted = hub.broker.delete_vhost(name, &mut outbox);
            hub.dispatch(&mut outbox);
            deleted.map_err(AdminError::Broker)?;
            info!(vhost = %name, connections_closed = closed, "vhost deleted");
            hub.broker.take_topology_wait()
        };
        // The queues' deletion is on disk before the vhost's.
        if let Some((waiter, ticket)) = durable_wait {
            waiter.wait_durable(ticket).map_err(|error| {
                AdminError::Broker(BrokerError::TopologyNotSaved(error.to_string()))
            })?;
        }
        self.access.delete_vhost(name)?;
        Ok(())
    }

    /// Adds or replaces a policy, applies it to what it matches, and
    /// returns once it is durable; true when it is new.
    pub fn set_policy(&self, spec: PolicySpec) -> Result<bool, AdminError> {
        let (name, vhost) = (spec.name.clone(), spec.vhost.clone());
        let (created, durable_wait) = {
            let mut hub = self.hub.lock();
            let mut outbox = Outbox::default();
            let created = hub.broker.set_policy(spec, &mut outbox);
            hub.dispatch(&mut outbox);
            (
                created.map_err(AdminError::Policy)?,
                hub.broker.take_topology_wait(),
            )
        };
        wait_saved(durable_wait)?;
        info!(policy = %name, %vhost, created, "policy set");
        Ok(created)
    }

    /// Removes a policy and lifts what it set; false when there was none.
    pub fn clear_policy(
        &self,
        kind: PolicyKind,
        vhost: &str,
        name: &str,
    ) -> Result<bool, AdminError> {
        let (found, durable_wait) = {
            let mut hub = self.hub.lock();
            let mut outbox = Outbox::default();
            let found = hub.broker.clear_policy(kind, vhost, name, &mut outbox);
            hub.dispatch(&mut outbox);
            (
                found.map_err(AdminError::Policy)?,
                hub.broker.take_topology_wait(),
            )
        };
        wait_saved(durable_wait)?;
        if found {
            info!(policy = %name, %vhost, "policy cleared");
        }
        Ok(found)
    }

    /// Sets (or, with a negative value, lifts) a vhost limit: kept with
    /// the vhost, and `max-queues` told to the broker at once.
    pub fn set_vhost_limit(&self, vhost: &str, name: &str, value: i64) -> Result<(), AdminError> {
        self.access.set_vhost_limit(vhost, name, value)?;
        if name == "max-queues" {
            let max = self
                .access
                .vhost_limits(vhost)
                .and_then(|limits| limits.max_queues)
                .map(|max| max as usize);
            self.hub.lock().broker.set_vhost_queue_limit(vhost, max);
        }
        info!(%vhost, limit = %name, value, "vhost limit set");
        Ok(())
    }

    /// True when the user is new.
    pub fn put_user(
        &self,
        name: &str,
        password: PasswordChange,
        tags: Tags,
    ) -> Result<bool, AdminError> {
        let created = self.access.put_user(name, password, tags)?;
        info!(user = %name, created, "user saved");
        Ok(created)
    }

    /// Deletes the user and closes their connections, as RabbitMQ does.
    pub fn delete_user(&self, name: &str) -> Result<(), AdminError> {
        self.access.delete_user(name)?;
        let reason = format!("user '{name}' is deleted");
        let closed = self
            .hub
            .lock()
            .close_connections_where(|info| info.user == name, &reason);
        info!(user = %name, connections_closed = closed, "user deleted");
        Ok(())
    }

    pub fn set_permissions(
        &self,
        user: &str,
        vhost: &str,
        permissions: Permissions,
    ) -> Result<(), AdminError> {
        self.access.set_permissions(user, vhost, permissions)?;
        info!(%user, %vhost, "permissions set");
        Ok(())
    }

    pub fn clear_permissions(&self, user: &str, vhost: &str) -> Result<(), AdminError> {
        self.access.clear_permissions(user, vhost)?;
        info!(%user, %vhost, "permissions cleared");
        Ok(())
    }
}

/// Waits until the journal has the change an operation made, if it made one.
fn wait_saved(
    durable_wait: Option<(warren_store::TopologyWaiter, warren_store::Ticket)>,
) -> Result<(), AdminError> {
    if let Some((waiter, ticket)) = durable_wait {
        waiter.wait_durable(ticket).map_err(|error| {
            AdminError::Policy(BrokerError::TopologyNotSaved(error.to_string()))
        })?;
    }
    Ok(())
}
