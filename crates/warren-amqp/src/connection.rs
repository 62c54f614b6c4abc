//! One client connection: the opening handshake, the frame loop, heartbeats
//! and the closing handshake, around the connection's `Session`.
//!
//! A protocol error closes this connection with the right reply code and
//! nothing else: every failure here ends in `Fault`, never in a panic, and
//! the broker releases what the connection held when it goes.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};
use warren_access::Grant;
use warren_core::{ErrorCode, FlowGauge};
use warren_proto::table_limits::TableLimits;
use warren_proto::{FRAME_MIN_SIZE_BYTES, Frame, FrameDecoder, FrameError, is_protocol_header};

use crate::auth::{self, AuthError};
use crate::config::{AmqpConfig, Product};
use crate::error::AmqpError;
use crate::hub::{ConnectionInfo, ConnectionNotice, SharedHub, wall_clock_ms};
use crate::mailbox::Mailbox;
use crate::session::{
    FLOW_PAUSE_MAX, FLOW_POLL_INTERVAL, Fault, Session, describe_frame, method_name, shutdown_fault,
};
use crate::storage::StorageSignals;
use crate::transport::{ReadHalf, Transport};
use crate::turn::Turn;
use crate::writer::{Outbound, Tuning, outbound_queue};

/// How long the broker waits for `connection.close-ok` after sending
/// `connection.close` before dropping the socket anyway.
const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(3);

/// Most bytes read at a time once the peer has logged in; the buffer grows
/// up to one frame_max when a large frame arrives. A connection starts
/// from `HANDSHAKE_READ_CHUNK_BYTES` and doubles its reads each time one
/// fills the room it had, so a busy publisher reads 64 KiB at a time after
/// a few reads while an idle connection keeps a buffer of a few KiB.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Bytes read at a time before the peer has logged in. With frames capped at
/// the AMQP minimum until `connection.tune-ok`, a peer that has not
/// authenticated can make the broker hold only a few KiB, however many such
/// peers there are and however slowly they send.
const HANDSHAKE_READ_CHUNK_BYTES: usize = FRAME_MIN_SIZE_BYTES as usize;
/// Frames handled between two looks at the clock for the end of a turn: a
/// look costs about as much as a small frame, and 64 small publishes take
/// well under a turn.
const FRAMES_BETWEEN_TURN_LOOKS: u32 = 64;

/// Whether the client ended the connection itself (see `finish`).
enum FaultKind {
    ClosedByClient,
    Other,
}

pub(crate) struct Connection {
    /// What the connection's channels do; the rest of this struct is the
    /// socket and the AMQP framing around it.
    pub(crate) session: Session,
    pub(crate) peer: SocketAddr,
    /// The listener's address this connection came in on.
    local: SocketAddr,
    tuning: Arc<Tuning>,
    reader: ReadHalf,
    buffer: BytesMut,
    decoder: FrameDecoder,
    frame_max_bytes: u32,
    heartbeat_s: u16,
    /// Bytes `read_more` makes room for: small at first, larger as reads
    /// fill the room they had, up to `read_chunk_max_bytes`.
    read_chunk_bytes: usize,
    /// `HANDSHAKE_READ_CHUNK_BYTES` until the peer has logged in, then
    /// `READ_CHUNK_BYTES`.
    read_chunk_max_bytes: usize,
    /// Argon2 checks run on the blocking pool, at most this many at once.
    logins: Arc<Semaphore>,
    /// The common name of the client's verified TLS certificate, for
    /// EXTERNAL.
    certificate_name: Option<String>,
    /// When the opening handshake must be done.
    handshake_deadline: Instant,
    /// Whether the broker has this connection registered.
    opened: bool,
    /// Whether the client understands `connection.blocked`.
    blocked_notify: bool,
    /// What the broker asks of this connection (closing a channel whose
    /// consumer timed out); a clone is handed to the hub on open.
    notices: Mailbox<ConnectionNotice>,
    /// Notices taken from the mailbox and not handled yet.
    notices_taken: VecDeque<ConnectionNotice>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The writer stops at the first Close; this one matters only when
        // the reader ends without `finish`, so that its writer ends too.
        self.session.out.send(Outbound::Close);
    }
}

/// What every connection task is handed by the listener.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) config: Arc<AmqpConfig>,
    pub(crate) hub: SharedHub,
    pub(crate) signals: StorageSignals,
    /// Argon2 checks run on the blocking pool, at most this many at once.
    pub(crate) logins: Arc<Semaphore>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Serves one accepted socket until it closes. `handshake_deadline`: the
/// peer must have opened its vhost by then (TLS handshake included).
pub(crate) async fn serve(
    transport: Transport,
    peer: SocketAddr,
    handshake_deadline: Instant,
    shared: Shared,
) {
    let Shared {
        config,
        hub,
        signals,
        logins,
        shutdown,
    } = shared;
    let Transport {
        reader,
        writer: writer_half,
        local,
        certificate_name,
    } = transport;
    let id = hub.read().allocate_connection_id();
    let (out, writer) = outbound_queue(id, writer_half, hub.clone());
    let tuning = Arc::new(Tuning::new(config.frame_max_bytes));
    let writer_task = tokio::spawn(writer.run(Arc::clone(&tuning)));
    let mut connection = Connection {
        session: Session::new(id, Arc::clone(&config), hub, out, signals, shutdown),
        peer,
        local,
        // Until tune-ok, frames are capped at the AMQP minimum (§4.2.3).
        decoder: FrameDecoder::new(FRAME_MIN_SIZE_BYTES).with_table_limits(TableLimits::new(
            config.table_depth_max,
            config.headers_size_max_bytes,
        )),
        frame_max_bytes: config.frame_max_bytes,
        heartbeat_s: 0,
        tuning,
        reader,
        buffer: BytesMut::with_capacity(HANDSHAKE_READ_CHUNK_BYTES),
        read_chunk_bytes: HANDSHAKE_READ_CHUNK_BYTES,
        read_chunk_max_bytes: HANDSHAKE_READ_CHUNK_BYTES,
        logins,
        certificate_name,
        handshake_deadline,
        opened: false,
        blocked_notify: false,
        notices: Mailbox::new(),
        notices_taken: VecDeque::new(),
    };
    let fault = connection.run().await;
    connection.finish(fault).await;
    let _ = writer_task.await;
}

impl Connection {
    async fn run(&mut self) -> Fault {
        match tokio::time::timeout_at(self.handshake_deadline, self.handshake()).await {
            Ok(Ok(())) => {}
            Ok(Err(fault)) => return fault,
            Err(_) => {
                warn!(peer = %self.peer, "closing connection: handshake not completed in time");
                return Fault::Gone;
            }
        }
        match self.frame_loop().await {
            Ok(()) => Fault::ClosedByClient,
            Err(fault) => fault,
        }
    }

    // ----- opening handshake ---------------------------------------------

    async fn handshake(&mut self) -> Result<(), Fault> {
        while self.buffer.len() < 8 {
            self.read_more().await?;
        }
        let header: [u8; 8] = self.buffer[..8].try_into().expect("eight bytes");
        if !is_protocol_header(&header) {
            debug!(peer = %self.peer, ?header, "wrong protocol header");
            self.session.out.send(Outbound::ProtocolHeader);
            self.session.out.send(Outbound::Close);
            return Err(Fault::Gone);
        }
        let _ = self.buffer.split_to(8);
        let mechanisms = if self.certificate_name.is_some() {
            auth::MECHANISMS_WITH_EXTERNAL
        } else {
            auth::MECHANISMS
        };
        self.session
            .out
            .method(0, start_method(mechanisms, self.session.config.product));

        let start_ok = match self.next_method().await? {
            AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)) => start_ok,
            other => return Err(unexpected_in_handshake("connection.start-ok", &other)),
        };
        let capabilities = client_capabilities(&start_ok.client_properties);
        self.blocked_notify = capabilities.connection_blocked;
        let login = {
            // The permit bounds how many Argon2 checks (19 MiB each) run at
            // once, whatever the number of peers logging in.
            let _permit = self.logins.acquire().await.map_err(|_| shutdown_fault())?;
            let access = Arc::clone(&self.session.config.access);
            let mechanism = start_ok.mechanism.to_string();
            let response = start_ok.response.as_bytes().to_vec();
            let peer = self.peer.ip();
            let certificate_name = self.certificate_name.clone();
            tokio::task::spawn_blocking(move || {
                auth::authenticate(
                    &access,
                    &mechanism,
                    &response,
                    peer,
                    certificate_name.as_deref(),
                )
            })
            .await
            .map_err(|_| shutdown_fault())?
        };
        match login {
            Ok(user) => self.session.user = user.name,
            Err(error) => {
                return Err(self.refuse_login(error, capabilities.authentication_failure_close));
            }
        }

        self.session.out.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: self.session.config.channel_max,
                frame_max: self.session.config.frame_max_bytes,
                heartbeat: self.session.config.heartbeat_s,
            })),
        );
        let tune_ok = match self.next_method().await? {
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)) => tune_ok,
            other => return Err(unexpected_in_handshake("connection.tune-ok", &other)),
        };
        self.apply_tuning(&tune_ok)?;

        let open = match self.next_method().await? {
            AMQPClass::Connection(connection::AMQPMethod::Open(open)) => open,
            other => return Err(unexpected_in_handshake("connection.open", &other)),
        };
        let vhost = open.virtual_host.as_str();
        let refuse_open = |text: String| Fault::Connection {
            error: AmqpError::not_allowed(text),
            class_id: 10,
            method_id: 40,
        };
        if let Err(refusal) = self
            .session
            .config
            .access
            .open_vhost(&self.session.user, vhost)
        {
            warn!(peer = %self.peer, user = %self.session.user, %refusal, "connection.open refused");
            return Err(refuse_open(refusal.to_string()));
        }
        {
            let mut hub = self.session.hub.lock();
            let user_connections = hub.connections_of_user(&self.session.user);
            let user_connections_max = self.session.config.connections_per_user_max;
            if user_connections >= user_connections_max {
                warn!(peer = %self.peer, user = %self.session.user, limit = user_connections_max,
                    "connection.open refused: the user's connection limit is reached");
                return Err(refuse_open(format!(
                    "Connection refused for user '{}'. User connection limit ({user_connections_max}) is reached",
                    self.session.user
                )));
            }
            if let Some(max) = self
                .session
                .config
                .access
                .vhost_limits(vhost)
                .and_then(|limits| limits.max_connections)
                && hub.client_connections_in(vhost) as u64 >= max
            {
                warn!(peer = %self.peer, user = %self.session.user, %vhost, limit = max,
                    "connection.open refused: the vhost's connection limit is reached");
                return Err(refuse_open(format!(
                    "access to vhost '{vhost}' refused for user '{}': connection limit ({max}) is reached",
                    self.session.user
                )));
            }
            // The access control is the authority on which vhosts exist; the
            // broker learns of one made at run time here at the latest.
            hub.broker.add_vhost(vhost);
            hub.broker
                .open_connection(self.session.id, vhost, capabilities.consumer_cancel_notify);
            let info = ConnectionInfo {
                id: self.session.id,
                peer: self.peer,
                local: self.local,
                user: self.session.user.clone(),
                vhost: vhost.to_owned(),
                client_properties: start_ok.client_properties.clone(),
                connected_at_ms: wall_clock_ms(),
                channel_max: self.session.channel_max,
                frame_max_bytes: self.frame_max_bytes,
                heartbeat_s: self.heartbeat_s,
                direct: false,
            };
            hub.register_connection(info, self.session.out.clone(), self.notices.clone());
            self.opened = true;
        }
        self.session.grant = Some(Grant::new(
            Arc::clone(&self.session.config.access),
            &self.session.user,
            vhost,
        ));
        self.read_chunk_max_bytes = READ_CHUNK_BYTES;
        self.session.out.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        );
        info!(
            connection = self.session.id.0,
            peer = %self.peer,
            user = %self.session.user,
            vhost = %vhost,
            heartbeat_s = self.heartbeat_s,
            "connection opened"
        );
        Ok(())
    }

    fn refuse_login(&mut self, error: AuthError, failure_close: bool) -> Fault {
        warn!(peer = %self.peer, %error, "login refused");
        let code = match error {
            AuthError::UnknownMechanism(_) | AuthError::MalformedResponse(_) => {
                ErrorCode::CommandInvalid
            }
            AuthError::Refused { .. } | AuthError::LoopbackOnly(_) => ErrorCode::AccessRefused,
        };
        if code == ErrorCode::AccessRefused && !failure_close {
            // A client without authentication_failure_close gets the socket
            // closed, as RabbitMQ does.
            self.session.out.send(Outbound::Close);
            return Fault::Gone;
        }
        // RabbitMQ names no method in a refused login's close (0, 0); a
        // malformed start-ok is blamed on connection.start-ok.
        let (class_id, method_id) = match code {
            ErrorCode::AccessRefused => (0, 0),
            _ => (10, 11),
        };
        Fault::Connection {
            error: AmqpError::new(code, error.to_string()),
            class_id,
            method_id,
        }
    }

    fn apply_tuning(&mut self, tune_ok: &connection::TuneOk) -> Result<(), Fault> {
        let refuse = |text: String| Fault::Connection {
            error: AmqpError::not_allowed(text),
            class_id: 10,
            method_id: 31,
        };
        let server_frame_max = self.session.config.frame_max_bytes;
        let frame_max = match tune_ok.frame_max {
            0 => server_frame_max,
            requested if requested < FRAME_MIN_SIZE_BYTES => {
                return Err(refuse(format!(
                    "frame_max={requested} < {FRAME_MIN_SIZE_BYTES} min size"
                )));
            }
            requested if requested > server_frame_max => {
                return Err(refuse(format!(
                    "frame_max={requested} > {server_frame_max} max size"
                )));
            }
            requested => requested,
        };
        let channel_max = match tune_ok.channel_max {
            0 => self.session.config.channel_max,
            requested if requested > self.session.config.channel_max => {
                return Err(refuse(format!(
                    "channel_max={requested} > {} max channels",
                    self.session.config.channel_max
                )));
            }
            requested => requested,
        };
        self.frame_max_bytes = frame_max;
        self.session.channel_max = channel_max;
        self.heartbeat_s = tune_ok.heartbeat;
        self.decoder.set_frame_max(frame_max);
        self.tuning.set(frame_max, tune_ok.heartbeat);
        Ok(())
    }

    async fn next_method(&mut self) -> Result<AMQPClass, Fault> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buffer)? {
                return match frame {
                    Frame::Method(0, method) => Ok(*method),
                    Frame::Heartbeat(0) => continue,
                    other => Err(Fault::connection(AmqpError::command_invalid(format!(
                        "expected a method on channel 0 during the opening handshake, got {}",
                        describe_frame(&other)
                    )))),
                };
            }
            self.read_more().await?;
        }
    }

    // ----- frame loop ----------------------------------------------------

    async fn frame_loop(&mut self) -> Result<(), Fault> {
        let mut turn = Turn::new();
        let mut frames_since_look = 0u32;
        loop {
            loop {
                // One read can hold hundreds of small publishes: the turn is
                // looked at between them too, not only between reads.
                frames_since_look += 1;
                if frames_since_look == FRAMES_BETWEEN_TURN_LOOKS {
                    frames_since_look = 0;
                    turn.end_if_long().await;
                }
                let frame = match self.decoder.decode(&mut self.buffer) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(FrameError::HeadersTooLarge {
                        channel,
                        size_bytes,
                        max_bytes,
                    }) if channel != 0 => {
                        let error = AmqpError::precondition_failed(format!(
                            "message headers of {size_bytes} bytes are larger than the \
                             configured max size {max_bytes}"
                        ));
                        self.session.refuse_content_header(channel, error)?;
                        continue;
                    }
                    Err(error) => return Err(error.into()),
                };
                if self.handle_frame(frame)? {
                    return Ok(());
                }
                if let Some(held) = self.session.held_replies.get_mut().take() {
                    self.session.release_held_replies(held).await?;
                }
                if let Some((channel, ticket)) = self.session.commit_waiting.take() {
                    self.session.finish_commit(channel, ticket).await?;
                }
            }
            self.session.process_confirms();
            self.apply_backpressure().await?;
            // A publisher that keeps the socket full never makes a read
            // wait.
            turn.end_if_long().await;
            self.read_more().await?;
        }
    }

    /// Stops reading from this connection while what it already sent has
    /// not drained: its socket's outbound queue, its confirms waiting for
    /// the disk, or the log's unwritten bytes; and, for a publisher, while
    /// a queue it feeds is behind its consumers or the disk alarm is raised.
    async fn apply_backpressure(&mut self) -> Result<(), Fault> {
        if let Some(gauge) = self.session.paused_by.take() {
            self.hold_for_consumers(&gauge).await?;
        }
        while self.session.out.queued() > self.session.config.outbound_frames_max {
            self.session.out.drained().await;
        }
        loop {
            let congested = self
                .session
                .hub
                .read()
                .broker
                .message_log()
                .is_some_and(|log| log.is_congested());
            let confirms_full = self.session.confirms_waiting_max()
                > self.session.config.pending_confirms_per_channel_max;
            if !(congested || confirms_full) || self.session.signals.durable.borrow().poisoned {
                break;
            }
            self.session.wait_for_durable_progress().await?;
        }
        if self.session.has_published && self.session.signals.alarms.borrow().any() {
            self.block_while_alarmed().await?;
        }
        Ok(())
    }

    /// Waits, up to `FLOW_PAUSE_MAX`, for the queue's consumers to catch
    /// up, sending confirms meanwhile.
    async fn hold_for_consumers(&mut self, gauge: &FlowGauge) -> Result<(), Fault> {
        let deadline = tokio::time::Instant::now() + FLOW_PAUSE_MAX;
        let ready_max = self.session.config.limits.flow_ready_max;
        while gauge.holds(ready_max) {
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(FLOW_POLL_INTERVAL) => {}
                changed = self.session.signals.durable.changed() => {
                    if changed.is_err() {
                        return Err(Fault::Gone);
                    }
                    self.session.process_confirms();
                }
                _ = self.session.shutdown.changed() => return Err(shutdown_fault()),
            }
        }
        Ok(())
    }

    /// Blocks a publisher while a resource alarm is raised: it gets
    /// `connection.blocked` (when it said it understands it) and is not
    /// read until every alarm has cleared.
    async fn block_while_alarmed(&mut self) -> Result<(), Fault> {
        let send = |connection: &Connection, method: connection::AMQPMethod| {
            if connection.blocked_notify {
                connection
                    .session
                    .out
                    .method(0, AMQPClass::Connection(method));
            }
        };
        let reason = self.session.signals.alarms.borrow().reason();
        send(
            self,
            connection::AMQPMethod::Blocked(connection::Blocked {
                reason: reason.into(),
            }),
        );
        info!(
            connection = self.session.id.0,
            reason, "publisher blocked by a resource alarm"
        );
        while self.session.signals.alarms.borrow().any() {
            tokio::select! {
                changed = self.session.signals.alarms.changed() => {
                    if changed.is_err() {
                        return Err(Fault::Gone);
                    }
                }
                changed = self.session.signals.durable.changed() => {
                    if changed.is_err() {
                        return Err(Fault::Gone);
                    }
                    self.session.process_confirms();
                }
                _ = self.session.shutdown.changed() => return Err(shutdown_fault()),
            }
        }
        send(
            self,
            connection::AMQPMethod::Unblocked(connection::Unblocked {}),
        );
        info!(connection = self.session.id.0, "publisher unblocked");
        Ok(())
    }

    /// Returns true when the client has closed the connection.
    fn handle_frame(&mut self, frame: Frame) -> Result<bool, Fault> {
        match frame {
            Frame::Heartbeat(0) => Ok(false),
            Frame::Heartbeat(channel) => Err(Fault::connection(AmqpError::new(
                ErrorCode::FrameError,
                format!("heartbeat frame on channel {channel}; heartbeats belong on channel 0"),
            ))),
            Frame::Method(0, method) => self.handle_connection_method(*method),
            Frame::Method(_, ref method) if matches!(**method, AMQPClass::Connection(_)) => {
                Err(Fault::connection(AmqpError::command_invalid(format!(
                    "connection method {} on channel {}; connection methods belong on channel 0",
                    method_name(method),
                    frame.channel()
                ))))
            }
            Frame::BasicQos { channel: 0, .. }
            | Frame::Header { channel: 0, .. }
            | Frame::Body(0, _) => Err(Fault::connection(AmqpError::new(
                ErrorCode::CommandInvalid,
                format!(
                    "{} on channel 0, which is reserved for the connection",
                    describe_frame(&frame)
                ),
            ))),
            frame => {
                self.session.handle_channel_frame(frame)?;
                Ok(false)
            }
        }
    }

    fn handle_connection_method(&mut self, method: AMQPClass) -> Result<bool, Fault> {
        match method {
            AMQPClass::Connection(connection::AMQPMethod::Close(close)) => {
                debug!(connection = self.session.id.0, code = close.reply_code, text = %close.reply_text, "client closed connection");
                self.session.process_confirms();
                self.session.out.method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                Ok(true)
            }
            AMQPClass::Connection(connection::AMQPMethod::Blocked(_))
            | AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => Ok(false),
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(_)) => {
                self.session.out.method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::UpdateSecretOk(
                        connection::UpdateSecretOk {},
                    )),
                );
                Ok(false)
            }
            other => Err(Fault::Connection {
                error: AmqpError::command_invalid(format!(
                    "unexpected method {} on channel 0 of an open connection",
                    method_name(&other)
                )),
                class_id: other.get_amqp_class_id(),
                method_id: other.get_amqp_method_id(),
            }),
        }
    }

    async fn read_more(&mut self) -> Result<(), Fault> {
        // Two missed heartbeats and the peer is considered gone.
        let silence_max = match self.heartbeat_s {
            0 => Duration::from_secs(u32::MAX as u64),
            seconds => Duration::from_secs(seconds as u64 * 2),
        };
        if self.buffer.capacity() - self.buffer.len() < HANDSHAKE_READ_CHUNK_BYTES {
            self.buffer.reserve(self.read_chunk_bytes);
        }
        let room = self.buffer.capacity() - self.buffer.len();
        let awaits_durable = self.session.confirms_waiting_max() > 0;
        tokio::select! {
            read = tokio::time::timeout(silence_max, self.reader.read_buf(&mut self.buffer)) => match read {
                Ok(Ok(0)) | Ok(Err(_)) => Err(Fault::Gone),
                Ok(Ok(read)) => {
                    // A read that filled its room likely left more behind.
                    if read == room {
                        self.read_chunk_bytes =
                            (self.read_chunk_bytes * 2).min(self.read_chunk_max_bytes);
                    }
                    Ok(())
                }
                Err(_) => {
                    warn!(connection = self.session.id.0, peer = %self.peer, heartbeat_s = self.heartbeat_s,
                        "closing connection: missed heartbeats from client");
                    Err(Fault::Gone)
                }
            },
            // Only a connection with confirms outstanding wakes when the
            // log syncs: an idle one, or a consumer, sleeps through fsyncs.
            changed = self.session.signals.durable.changed(), if awaits_durable => {
                if changed.is_err() {
                    return Err(Fault::Gone);
                }
                self.session.process_confirms();
                Ok(())
            }
            _ = self.notices.ready() => self.handle_notices(),
            () = tokio::time::sleep(FLOW_POLL_INTERVAL), if self.session.confirms_held.is_some() => {
                self.session.process_confirms();
                Ok(())
            }
            _ = self.session.shutdown.changed() => Err(shutdown_fault()),
        }
    }

    fn handle_notices(&mut self) -> Result<(), Fault> {
        self.notices.take_all(&mut self.notices_taken);
        while let Some(notice) = self.notices_taken.pop_front() {
            self.handle_notice(notice)?;
        }
        Ok(())
    }

    fn handle_notice(&mut self, notice: ConnectionNotice) -> Result<(), Fault> {
        match notice {
            ConnectionNotice::CloseChannel { channel, error } => {
                self.session.close_channel_by_broker(channel, error);
                Ok(())
            }
            ConnectionNotice::Close { reason } => {
                info!(connection = self.session.id.0, peer = %self.peer, %reason, "closing connection on request");
                Err(Fault::connection(AmqpError::new(
                    ErrorCode::ConnectionForced,
                    reason,
                )))
            }
        }
    }

    // ----- closing -------------------------------------------------------

    async fn finish(&mut self, fault: Fault) {
        let fault_kind = match &fault {
            Fault::ClosedByClient => FaultKind::ClosedByClient,
            _ => FaultKind::Other,
        };
        match fault {
            Fault::Gone | Fault::ClosedByClient => {}
            Fault::Connection {
                error,
                class_id,
                method_id,
            } => {
                if error.code != ErrorCode::ConnectionForced {
                    warn!(connection = self.session.id.0, peer = %self.peer, code = error.code.reply_code(),
                        error = %error.text, "closing connection on error");
                }
                self.session.process_confirms();
                self.session.out.method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                        reply_code: error.code.reply_code(),
                        reply_text: ShortString::from(error.reply_text()),
                        class_id,
                        method_id,
                    })),
                );
                let _ = tokio::time::timeout(CLOSE_OK_TIMEOUT, self.await_close_ok()).await;
            }
        }
        if self.opened {
            self.session.hub.lock().remove_connection(self.session.id);
            info!(connection = self.session.id.0, peer = %self.peer, "connection closed");
        }
        if matches!(fault_kind, FaultKind::ClosedByClient) {
            // As RabbitMQ does, leave closing the socket to the client once
            // it has its close-ok: clients treat the server hanging up
            // first as an I/O error.
            let _ = tokio::time::timeout(CLOSE_OK_TIMEOUT, self.await_peer_close()).await;
        }
        self.session.out.send(Outbound::Close);
    }

    /// Reads and discards until the client closes its side.
    async fn await_peer_close(&mut self) {
        loop {
            self.buffer.clear();
            match self.reader.read_buf(&mut self.buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// After `connection.close`, everything but `close-ok` (or a crossing
    /// `close`) is discarded.
    async fn await_close_ok(&mut self) {
        loop {
            loop {
                match self.decoder.decode(&mut self.buffer) {
                    Ok(Some(Frame::Method(0, method))) => {
                        if matches!(
                            *method,
                            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))
                                | AMQPClass::Connection(connection::AMQPMethod::Close(_))
                        ) {
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            let read = self.reader.read_buf(&mut self.buffer).await;
            if !matches!(read, Ok(count) if count > 0) {
                return;
            }
        }
    }
}

struct ClientCapabilities {
    consumer_cancel_notify: bool,
    authentication_failure_close: bool,
    connection_blocked: bool,
}

fn client_capabilities(client_properties: &FieldTable) -> ClientCapabilities {
    let capabilities = match client_properties.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(table)) => Some(table),
        _ => None,
    };
    let flag = |name: &str| {
        capabilities
            .is_some_and(|table| matches!(table.inner().get(name), Some(AMQPValue::Boolean(true))))
    };
    ClientCapabilities {
        consumer_cancel_notify: flag("consumer_cancel_notify"),
        authentication_failure_close: flag("authentication_failure_close"),
        connection_blocked: flag("connection.blocked"),
    }
}

/// `connection.start`: who we are and what we implement. The capabilities
/// table claims only features that work.
fn start_method(mechanisms: &str, product: Product) -> AMQPClass {
    let mut capabilities = FieldTable::default();
    for capability in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "per_consumer_qos",
        "authentication_failure_close",
        "connection.blocked",
        "consumer_priorities",
        "direct_reply_to",
    ] {
        capabilities.insert(capability.into(), AMQPValue::Boolean(true));
    }
    let mut server_properties = FieldTable::default();
    let mut text = |key: &str, value: &str| {
        server_properties.insert(key.into(), AMQPValue::LongString(value.into()));
    };
    text("product", product.name());
    text("version", product.version());
    text("platform", "Rust");
    text(
        "information",
        "A RabbitMQ-compatible message broker for AI/ML workloads",
    );
    server_properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties,
        mechanisms: LongString::from(mechanisms),
        locales: LongString::from("en_US"),
    }))
}

fn unexpected_in_handshake(expected: &str, got: &AMQPClass) -> Fault {
    Fault::Connection {
        error: AmqpError::command_invalid(format!(
            "expected {expected} during the opening handshake, got {}",
            method_name(got)
        )),
        class_id: got.get_amqp_class_id(),
        method_id: got.get_amqp_method_id(),
    }
}
