//! The HTTP side's AMQP client: everything that changes the broker
//! (declares, deletes, publishes, gets, consumers) goes through an AMQP
//! connection opened as the requesting user, as RabbitMQ's management
//! plugin does with its internal client. The broker's rules, error codes
//! and (later) permissions then apply to HTTP exactly as to AMQP clients.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use lapin::uri::{AMQPAuthority, AMQPUri, AMQPUserInfo};
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind};
use tokio::sync::Mutex;

use crate::auth::Credentials;
use crate::error::ApiError;

/// Connections kept open, one per user and vhost in use. Past this many,
/// the least recently used is closed to make room (it is reopened on
/// demand).
pub const GATEWAY_CONNECTIONS_MAX: usize = 64;

pub struct Gateway {
    amqp_address: SocketAddr,
    connections: Mutex<HashMap<(String, String), PooledConnection>>,
}

struct PooledConnection {
    connection: Connection,
    last_used: Instant,
}

impl Gateway {
    /// `amqp_address` is the broker's own AMQP listener, reached over
    /// loopback when it listens on every interface.
    pub fn new(amqp_address: SocketAddr) -> Self {
        let mut address = amqp_address;
        if address.ip().is_unspecified() {
            address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        Self {
            amqp_address: address,
            connections: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh channel on the user's connection to `vhost`, closed when
    /// dropped.
    pub async fn channel(
        &self,
        user: &Credentials,
        vhost: &str,
    ) -> Result<ScopedChannel, ApiError> {
        self.open_channel(user, vhost).await.map(ScopedChannel)
    }

    async fn open_channel(&self, user: &Credentials, vhost: &str) -> Result<Channel, ApiError> {
        let key = (user.user.clone(), vhost.to_owned());
        let mut connections = self.connections.lock().await;
        if let Some(pooled) = connections.get_mut(&key) {
            if pooled.connection.status().connected() {
                pooled.last_used = Instant::now();
                match pooled.connection.create_channel().await {
                    Ok(channel) => return Ok(channel),
                    Err(error) => {
                        tracing::debug!(%error, "gateway connection unusable; reconnecting")
                    }
                }
            }
            connections.remove(&key);
        }
        if connections.len() >= GATEWAY_CONNECTIONS_MAX
            && let Some(evicted) = connections
                .iter()
                .min_by_key(|(_, pooled)| pooled.last_used)
                .map(|(key, _)| key.clone())
            && let Some(pooled) = connections.remove(&evicted)
        {
            let _ = pooled.connection.close(200, "OK".into()).await;
        }
        let connection = self.connect(user, vhost).await?;
        let channel = connection.create_channel().await.map_err(amqp_error)?;
        connections.insert(
            key,
            PooledConnection {
                connection,
                last_used: Instant::now(),
            },
        );
        Ok(channel)
    }

    async fn connect(&self, user: &Credentials, vhost: &str) -> Result<Connection, ApiError> {
        let uri = AMQPUri {
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo {
                    username: user.user.clone(),
                    password: user.password.clone(),
                },
                host: self.amqp_address.ip().to_string(),
                port: self.amqp_address.port(),
            },
            vhost: vhost.to_owned(),
            ..AMQPUri::default()
        };
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("HTTP gateway ({})", user.user).into());
        Connection::connect_uri(uri, properties)
            .await
            .map_err(|error| match error.kind() {
                // The broker refuses connection.open with 530 NOT_ALLOWED: for
                // an unknown vhost, or a user without permissions there (or
                // at their connection limit), in RabbitMQ's words.
                ErrorKind::ProtocolError(refusal) if refusal.get_id() == 530 => {
                    let reason = refusal.get_message().to_string();
                    if reason.contains("not found") {
                        ApiError::NotFound(format!("no vhost '{vhost}'"))
                    } else {
                        ApiError::Unauthorized(reason)
                    }
                }
                _ => amqp_error(error),
            })
    }

    /// Closes every connection (at shutdown).
    pub async fn close(&self) {
        for (_, pooled) in self.connections.lock().await.drain() {
            let _ = pooled.connection.close(200, "OK".into()).await;
        }
    }
}

/// A gateway channel that closes itself when the request is done, on every
/// path out of a handler, so that the shared connections do not collect
/// open channels.
pub struct ScopedChannel(Channel);

impl std::ops::Deref for ScopedChannel {
    type Target = Channel;

    fn deref(&self) -> &Channel {
        &self.0
    }
}

impl Drop for ScopedChannel {
    fn drop(&mut self) {
        if self.0.status().connected() {
            let channel = self.0.clone();
            tokio::spawn(async move {
                let _ = channel.close(200, "OK".into()).await;
            });
        }
    }
}

/// The HTTP form of an AMQP client error: the broker's refusals keep their
/// meaning (404, 406 → 400, 405 → 409); anything else means the broker
/// could not be reached.
pub fn amqp_error(error: lapin::Error) -> ApiError {
    match error.kind() {
        ErrorKind::ProtocolError(refusal) => {
            ApiError::from_amqp(refusal.get_id(), refusal.get_message().as_str())
        }
        _ => ApiError::Unavailable(format!("the broker did not answer: {error}")),
    }
}
