//! The AMQP listener: accepts sockets, enforces the connection limit, and
//! closes every connection with 320 CONNECTION_FORCED on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{error, info, warn};
use warren_core::Broker;

use crate::admin::Admin;
use crate::config::AmqpConfig;
use crate::connection;
use crate::hub::{Hub, SharedHub, wall_clock_ms};
use crate::storage::{self, StorageError, StorageSignals};

/// Password checks (Argon2id: about 19 MiB and tens of milliseconds each)
/// running at once; a flood of logins queues here instead of taking all the
/// memory and every core.
const LOGINS_IN_PROGRESS_MAX: usize = 4;

/// How long shutdown waits for connections to finish their closing
/// handshake before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub struct AmqpServer {
    listener: TcpListener,
    config: Arc<AmqpConfig>,
    hub: SharedHub,
    signals: StorageSignals,
    disk_alarm: watch::Sender<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding the AMQP listener: {0}")]
    Bind(#[from] std::io::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl AmqpServer {
    /// Recovers durable state, then binds the listener; `local_addr` then
    /// tells the port when 0 was asked.
    pub async fn bind(address: SocketAddr, config: AmqpConfig) -> Result<Self, StartError> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15)
            ^ (std::process::id() as u64) << 32;
        let mut broker = Broker::new(&config.access.vhosts(), config.limits.clone(), seed);
        broker.advance_clock(wall_clock_ms());
        let (signals, disk_alarm) = storage::open(&mut broker, &config.storage)?;
        let listener = TcpListener::bind(address).await?;
        Ok(Self {
            listener,
            config: Arc::new(config),
            hub: SharedHub::new(Hub::new(broker)),
            signals,
            disk_alarm,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The broker and its connections, for the HTTP side.
    pub fn hub(&self) -> SharedHub {
        self.hub.clone()
    }

    /// Changes to users, vhosts and permissions that reach the running
    /// broker (for the HTTP API).
    pub fn admin(&self) -> Admin {
        Admin::new(Arc::clone(&self.config.access), self.hub.clone())
    }

    pub fn config(&self) -> Arc<AmqpConfig> {
        Arc::clone(&self.config)
    }

    /// Accepts connections until `shutdown` turns true, then closes them all.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut connections = JoinSet::new();
        let logins = Arc::new(Semaphore::new(LOGINS_IN_PROGRESS_MAX));
        let timer = tokio::spawn(self.hub.clone().run_timer());
        let disk_monitor = tokio::spawn(storage::watch_disk(
            self.hub.clone(),
            self.config.storage.clone(),
            self.disk_alarm,
        ));
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        // Reap finished connection tasks so the set stays small.
                        while connections.try_join_next().is_some() {}
                        if connections.len() >= self.config.connections_max {
                            warn!(%peer, limit = self.config.connections_max,
                                "refusing connection: connection limit reached");
                            drop(socket);
                            continue;
                        }
                        connections.spawn(connection::serve(
                            socket,
                            peer,
                            Arc::clone(&self.config),
                            self.hub.clone(),
                            self.signals.clone(),
                            Arc::clone(&logins),
                            shutdown.clone(),
                        ));
                    }
                    Err(accept_error) => {
                        // Running out of file descriptors, for instance:
                        // back off instead of spinning.
                        error!(error = %accept_error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = shutdown.changed() => break,
            }
        }
        // Finished connection tasks are still in the set until joined.
        while connections.try_join_next().is_some() {}
        info!(
            connections = connections.len(),
            "AMQP listener stopped; closing connections"
        );
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        connections.abort_all();
        disk_monitor.abort();
        timer.abort();
        if let Err(error) = self.hub.lock().broker.close_store() {
            error!(%error, "the message store did not close cleanly");
        }
    }
}
