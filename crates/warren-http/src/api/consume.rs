//! `GET /api/queues/{vhost}/{name}/consume`: a consumer over WebSocket.
//!
//! Each message goes to the client as a JSON text frame; the client
//! settles it with `{"ack": TAG}`, `{"nack": TAG, "requeue": BOOL}` or
//! `{"reject": TAG, "requeue": BOOL}`. At most `prefetch` messages are
//! outstanding. The consumer is an AMQP consumer on its own channel, so
//! when the socket closes the channel closes and the broker requeues every
//! message not acknowledged, exactly as for an AMQP client that goes away.

use std::collections::{BTreeSet, HashMap};

use amq_protocol::protocol::{AMQPClass, basic};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use warren_amqp::{DirectSession, Event};
use warren_core::Delivery;

use crate::api::queues;
use crate::auth::Credentials;
use crate::error::{ApiError, ApiResult};
use crate::json::{payload_to_json, properties_to_json};
use crate::session::{self, refusal};
use crate::state::AppState;

const PREFETCH_DEFAULT: u16 = 10;
/// WebSocket close code for a frame that breaks the protocol (RFC 6455).
const POLICY_VIOLATION: u16 = 1008;

/// A settlement frame from the client.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settlement {
    ack: Option<u64>,
    nack: Option<u64>,
    reject: Option<u64>,
    #[serde(default)]
    multiple: bool,
    #[serde(default = "requeue_by_default")]
    requeue: bool,
}

fn requeue_by_default() -> bool {
    true
}

pub async fn consume(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> ApiResult<Response> {
    let prefetch = match query.get("prefetch") {
        None => PREFETCH_DEFAULT,
        Some(text) => text
            .parse::<u16>()
            .ok()
            .filter(|count| (1..=state.config.websocket_prefetch_max).contains(count))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "prefetch must be from 1 to {}",
                    state.config.websocket_prefetch_max
                ))
            })?,
    };
    queues::find(&state, &user, &vhost, &name)?;
    // The consumer starts before the upgrade, so that a refusal (an
    // exclusive queue, say) is an HTTP error and not a closed socket.
    let mut session = session::open(&state, &user, &vhost)?;
    session.qos(prefetch).await.map_err(refusal)?;
    let consume = basic::Consume {
        queue: name.as_str().into(),
        ..basic::Consume::default()
    };
    session::call(
        &mut session,
        AMQPClass::Basic(basic::AMQPMethod::Consume(consume)),
    )
    .await?;
    tracing::debug!(vhost, queue = %name, user = %user.user, prefetch, "WebSocket consumer started");
    Ok(upgrade.on_upgrade(move |socket| relay(socket, session)))
}

/// Passes deliveries to the socket and settlements back until either side
/// ends; dropping the session then requeues what is unacknowledged.
async fn relay(mut socket: WebSocket, mut session: DirectSession) {
    let mut outstanding: BTreeSet<u64> = BTreeSet::new();
    loop {
        tokio::select! {
            event = session.next_event() => match event {
                Ok(Event::Delivery(delivery)) => {
                    outstanding.insert(delivery.delivery_tag);
                    let frame = delivery_frame(&delivery);
                    if socket.send(Message::Text(frame.into())).await.is_err() {
                        break;
                    }
                }
                // The queue was deleted or the broker went away.
                _ => {
                    let _ = socket.send(error_frame("the consumer was cancelled by the broker")).await;
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    if let Err(reason) = settle(&mut session, &mut outstanding, text.as_str()) {
                        let _ = socket.send(error_frame(&reason)).await;
                        let _ = socket
                            .send(Message::Close(Some(CloseFrame {
                                code: POLICY_VIOLATION,
                                reason: "bad settlement frame".into(),
                            })))
                            .await;
                        break;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Binary(_))) => {
                    let _ = socket.send(error_frame("settlements are JSON text frames")).await;
                    let _ = socket
                        .send(Message::Close(Some(CloseFrame {
                            code: POLICY_VIOLATION,
                            reason: "binary frame".into(),
                        })))
                        .await;
                    break;
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            },
        }
    }
    drop(session);
}

fn delivery_frame(delivery: &Delivery) -> String {
    let message = &delivery.message;
    let (payload, payload_encoding) = payload_to_json(&message.body, true);
    json!({
        "delivery_tag": delivery.delivery_tag,
        "redelivered": delivery.redelivered,
        "exchange": message.exchange.as_str(),
        "routing_key": message.routing_key.as_str(),
        "properties": properties_to_json(&message.properties),
        "payload": payload,
        "payload_encoding": payload_encoding,
    })
    .to_string()
}

fn error_frame(reason: &str) -> Message {
    Message::Text(json!({ "error": reason }).to_string().into())
}

/// Applies one settlement frame; an unknown tag is refused here, before
/// the broker would close the channel over it.
fn settle(
    session: &mut DirectSession,
    outstanding: &mut BTreeSet<u64>,
    text: &str,
) -> Result<(), String> {
    let settlement: Settlement =
        serde_json::from_str(text).map_err(|error| format!("malformed settlement: {error}"))?;
    let (tag, how) = match (settlement.ack, settlement.nack, settlement.reject) {
        (Some(tag), None, None) => (tag, "ack"),
        (None, Some(tag), None) => (tag, "nack"),
        (None, None, Some(tag)) => (tag, "reject"),
        _ => return Err("a settlement names exactly one of ack, nack or reject".to_owned()),
    };
    if !outstanding.contains(&tag) {
        return Err(format!("unknown delivery tag {tag}"));
    }
    if settlement.multiple && how == "reject" {
        return Err("reject settles one message; use nack with multiple".to_owned());
    }
    let settled = if settlement.multiple {
        let rest = outstanding.split_off(&(tag + 1));
        std::mem::replace(outstanding, rest).len()
    } else {
        outstanding.remove(&tag);
        1
    };
    let multiple = settlement.multiple;
    let requeue = settlement.requeue;
    let method = match how {
        "ack" => basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: tag,
            multiple,
        }),
        "nack" => basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: tag,
            multiple,
            requeue,
        }),
        _ => basic::AMQPMethod::Reject(basic::Reject {
            delivery_tag: tag,
            requeue,
        }),
    };
    let result = session.send(AMQPClass::Basic(method));
    tracing::trace!(tag, how, settled, "WebSocket settlement");
    result.map_err(|error| format!("the broker refused the settlement: {error}"))
}
