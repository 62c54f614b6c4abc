//! Model events: each load, switch and unload of a model version, as JSON
//! on the `amq.warren.model-events` topic exchange (routing key
//! `<model>.<event>`), so that other services learn of model updates the
//! way they learn of anything else, and the latest ones in memory for the
//! dashboard and `GET /api/models/events`.
//!
//! Events are published in order by one task with a direct session of its
//! own, as the broker's identity. An event published while nothing is
//! bound to the exchange is dropped by the broker, as any unroutable
//! message is.

use std::collections::VecDeque;
use std::net::SocketAddr;

use amq_protocol::protocol::{BasicProperties, basic};
use amq_protocol::types::ShortString;
use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use warren_amqp::{DirectConnector, DirectLogin, DirectSession};

/// The exchange model events go to (a built-in exchange of every vhost;
/// the events are published in the default vhost, where models live).
pub const EXCHANGE: &str = "amq.warren.model-events";
/// Events kept in memory for the dashboard.
pub const RECENT_MAX: usize = 100;
/// Events waiting to be published, at most; past this the oldest waiting
/// are dropped (with a warning) rather than holding a load up.
const WAITING_MAX: usize = 1_024;

pub struct ModelEvents {
    recent: Mutex<VecDeque<Value>>,
    outbox: mpsc::Sender<(String, Value)>,
}

impl ModelEvents {
    /// Starts the publishing task; events go out as the broker's own
    /// identity through `direct`.
    pub fn start(direct: DirectConnector, address: SocketAddr) -> Self {
        let (outbox, waiting) = mpsc::channel(WAITING_MAX);
        tokio::spawn(publish_forever(direct, address, waiting));
        Self {
            recent: Mutex::new(VecDeque::with_capacity(RECENT_MAX)),
            outbox,
        }
    }

    /// Records an event and queues it for the exchange. `details` are
    /// merged into `{"event", "model", "version", "time_ms"}`.
    pub fn publish(&self, event: &str, model: &str, version: &str, details: Value) {
        let mut body = json!({
            "event": event,
            "model": model,
            "version": version,
            "time_ms": warren_amqp::wall_clock_ms(),
        });
        if let (Some(body), Value::Object(details)) = (body.as_object_mut(), details) {
            body.extend(details);
        }
        tracing::info!(event, model, version, "model event");
        {
            let mut recent = self.recent.lock();
            if recent.len() == RECENT_MAX {
                recent.pop_front();
            }
            recent.push_back(body.clone());
        }
        if self
            .outbox
            .try_send((format!("{model}.{event}"), body))
            .is_err()
        {
            tracing::warn!(
                event,
                model,
                version,
                "model event not published: too many waiting"
            );
        }
    }

    /// The latest events, oldest first.
    pub fn recent(&self) -> Vec<Value> {
        self.recent.lock().iter().cloned().collect()
    }
}

async fn publish_forever(
    direct: DirectConnector,
    address: SocketAddr,
    mut waiting: mpsc::Receiver<(String, Value)>,
) {
    let mut session: Option<DirectSession> = None;
    while let Some((routing_key, body)) = waiting.recv().await {
        if session.is_none() {
            session = open(&direct, address);
        }
        let Some(open_session) = session.as_mut() else {
            continue;
        };
        if let Err(reason) = publish(open_session, &routing_key, &body).await {
            tracing::warn!(%reason, routing_key, "a model event could not be published");
            // A refused publish closes the channel: the next event opens
            // another session.
            session = None;
        }
    }
}

fn open(direct: &DirectConnector, address: SocketAddr) -> Option<DirectSession> {
    let login = DirectLogin {
        user: warren_access::INTERNAL_USER,
        vhost: "/",
        peer: address,
        local: address,
        name: "model events",
    };
    match direct.open(login) {
        Ok(session) => Some(session),
        Err(error) => {
            tracing::warn!(%error, "model events: no session with the broker");
            None
        }
    }
}

async fn publish(
    session: &mut DirectSession,
    routing_key: &str,
    body: &Value,
) -> Result<(), String> {
    let publish = basic::Publish {
        exchange: EXCHANGE.into(),
        routing_key: routing_key.into(),
        mandatory: false,
        immediate: false,
    };
    let properties = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_type(ShortString::from("warren.model-event"));
    let body = Bytes::from(serde_json::to_vec(body).expect("an event serialises"));
    let sequence = session
        .publish(publish, properties, body)
        .await
        .map_err(|error| error.reply_text())?;
    session
        .confirmation(sequence)
        .await
        .map_err(|error| error.reply_text())?;
    Ok(())
}
