//! The AMQP listener: accepts sockets, enforces the connection limit, and
//! closes every connection with 320 CONNECTION_FORCED on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};
use warren_core::Broker;

use crate::admin::Admin;
use crate::alarms::{Alarms, MemoryMonitor, watch_memory};
use crate::config::AmqpConfig;
use crate::connection::{self, Shared};
use crate::direct::DirectConnector;
use crate::hub::{Hub, SharedHub, wall_clock_ms};
use crate::listen;
use crate::storage::{self, StorageError, StorageSignals};
use crate::store_worker;
use crate::transport::Transport;

/// Password checks (Argon2id: about 19 MiB and tens of milliseconds each)
/// running at once; a flood of logins queues here instead of taking all the
/// memory and every core.
const LOGINS_IN_PROGRESS_MAX: usize = 4;

/// Accepts on the AMQPS listener, or never when there is none.
async fn accept_tls(
    listener: &Option<(TcpListener, TlsAcceptor)>,
) -> (
    std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
    Option<TlsAcceptor>,
) {
    match listener {
        Some((listener, acceptor)) => (listener.accept().await, Some(acceptor.clone())),
        None => std::future::pending().await,
    }
}

/// How long shutdown waits for connections to finish their closing
/// handshake before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub struct AmqpServer {
    listener: TcpListener,
    /// AMQPS: the TLS listener and its rustls acceptor, when configured.
    tls_listener: Option<(TcpListener, TlsAcceptor)>,
    config: Arc<AmqpConfig>,
    hub: SharedHub,
    signals: StorageSignals,
    alarms: watch::Sender<Alarms>,
    /// Dropped when the server stops, which direct sessions read as
    /// shutdown.
    running: watch::Sender<bool>,
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
        for (vhost, limits) in config.access.all_vhost_limits() {
            broker.set_vhost_queue_limit(&vhost, limits.max_queues.map(|max| max as usize));
        }
        broker.advance_clock(wall_clock_ms());
        let (signals, alarms) = storage::open(&mut broker, &config.storage)?;
        let listener = listen::bind(address).await?;
        let tls_listener = match &config.amqps {
            Some(amqps) => Some((
                listen::bind(amqps.address).await?,
                TlsAcceptor::from(Arc::clone(&amqps.tls)),
            )),
            None => None,
        };
        let memory = Arc::new(MemoryMonitor::new(config.storage.memory_high_watermark));
        let hub = SharedHub::new(Hub::new(broker), memory, signals.alarms.clone());
        store_worker::start(&hub)?;
        Ok(Self {
            listener,
            tls_listener,
            config: Arc::new(config),
            hub,
            signals,
            alarms,
            running: watch::channel(false).0,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The AMQPS listener's address, when there is one.
    pub fn tls_local_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.tls_listener
            .as_ref()
            .map(|(listener, _)| listener.local_addr())
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

    /// Opens in-process sessions for the HTTP side (see `direct.rs`).
    pub fn direct(&self) -> DirectConnector {
        DirectConnector::new(
            Arc::clone(&self.config),
            self.hub.clone(),
            self.signals.clone(),
            self.running.subscribe(),
        )
    }

    pub fn config(&self) -> Arc<AmqpConfig> {
        Arc::clone(&self.config)
    }

    /// Serves one connection over any byte stream as if it had come in on
    /// the AMQP listener, until it closes: how the fuzz target drives the
    /// connection state machine with raw bytes, without sockets.
    pub async fn serve_stream<S>(&self, stream: S, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        // Held until the connection ends: a dropped sender reads as shutdown.
        let (_shutdown_sender, shutdown) = watch::channel(false);
        let shared = Shared {
            config: Arc::clone(&self.config),
            hub: self.hub.clone(),
            signals: self.signals.clone(),
            logins: Arc::new(Semaphore::new(LOGINS_IN_PROGRESS_MAX)),
            shutdown,
        };
        let local = self.listener.local_addr().unwrap_or(peer);
        let deadline = Instant::now() + self.config.handshake_timeout;
        connection::serve(Transport::stream(stream, local), peer, deadline, shared).await;
    }

    /// Accepts connections until `shutdown` turns true, then closes them all.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut connections = JoinSet::new();
        let logins = Arc::new(Semaphore::new(LOGINS_IN_PROGRESS_MAX));
        let timer = tokio::spawn(self.hub.clone().run_timer());
        let disk_monitor = tokio::spawn(storage::watch_disk(
            self.hub.clone(),
            self.config.storage.clone(),
            self.alarms.clone(),
        ));
        let memory_monitor = tokio::spawn(watch_memory_pressure(
            self.hub.clone(),
            self.config.storage.memory_check_interval,
            self.alarms,
        ));
        let shared = Shared {
            config: Arc::clone(&self.config),
            hub: self.hub.clone(),
            signals: self.signals.clone(),
            logins,
            shutdown: shutdown.clone(),
        };
        loop {
            let (accepted, tls) = tokio::select! {
                accepted = self.listener.accept() => (accepted, None),
                accepted = accept_tls(&self.tls_listener) => accepted,
                _ = shutdown.changed() => break,
            };
            let (socket, peer) = match accepted {
                Ok((socket, peer)) => (socket, listen::canonical_peer(peer)),
                Err(accept_error) => {
                    // Running out of file descriptors, for instance: back
                    // off instead of spinning.
                    error!(error = %accept_error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Reap finished connection tasks so the set stays small.
            while connections.try_join_next().is_some() {}
            if connections.len() >= self.config.connections_max {
                warn!(%peer, limit = self.config.connections_max,
                    "refusing connection: connection limit reached");
                drop(socket);
                continue;
            }
            let deadline = Instant::now() + self.config.handshake_timeout;
            let shared = shared.clone();
            match tls {
                None => {
                    connections.spawn(connection::serve(
                        Transport::tcp(socket, peer),
                        peer,
                        deadline,
                        shared,
                    ));
                }
                Some(acceptor) => {
                    connections.spawn(async move {
                        let handshake = Transport::tls(socket, peer, &acceptor);
                        match tokio::time::timeout_at(deadline, handshake).await {
                            Ok(Ok(transport)) => {
                                connection::serve(transport, peer, deadline, shared).await;
                            }
                            Ok(Err(error)) => {
                                warn!(%peer, %error, "closing connection: TLS handshake failed");
                            }
                            Err(_) => {
                                warn!(%peer, "closing connection: TLS handshake not completed in time");
                            }
                        }
                    });
                }
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
        memory_monitor.abort();
        timer.abort();
        if let Err(error) = self.hub.lock().broker.close_store() {
            error!(%error, "the message store did not close cleanly");
        }
    }
}

/// Runs the memory alarm, and tells the broker whenever it changes: over
/// the watermark, queues keep new messages on disk rather than in memory.
async fn watch_memory_pressure(hub: SharedHub, interval: Duration, alarms: watch::Sender<Alarms>) {
    let mut raised = alarms.subscribe();
    let watcher = AbortOnDrop(tokio::spawn(watch_memory(
        Arc::clone(hub.memory()),
        interval,
        alarms,
    )));
    let mut pressure = false;
    while raised.changed().await.is_ok() {
        let memory = raised.borrow().memory;
        if memory != pressure {
            pressure = memory;
            hub.read().broker.set_memory_pressure(memory);
        }
    }
    drop(watcher);
}

/// Aborts a task when dropped, so that a helper task ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
