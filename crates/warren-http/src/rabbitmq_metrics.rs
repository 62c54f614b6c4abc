//! The metrics RabbitMQ's `rabbitmq_prometheus` plugin serves, under its
//! names, types and labels, so that RabbitMQ's Grafana dashboards and
//! alert rules work on Warren unchanged. `/metrics` serves them
//! aggregated (one sample per node, as RabbitMQ does by default);
//! `/metrics/per-object` gives the queue metrics one sample per queue,
//! labelled `vhost` and `queue`; `/metrics/detailed` gives only the
//! families asked for (`family=queue_coarse_metrics`,
//! `family=queue_consumer_count`), of the vhosts asked for, as
//! `rabbitmq_detailed_*`.
//!
//! Only what Warren measures is served (docs/http-api.md lists it). The
//! `rabbitmq_global_*` counters carry `protocol` but not `queue_type`:
//! the broker's totals are not split by queue type.

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::encoding::EncodeMetric;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use warren_amqp::{MESSAGE_SIZE_BUCKETS, PublishCounts};
use warren_core::{LifecycleCounts, MessageCounts, QueueInfo};

/// RabbitMQ's `protocol` label for AMQP 0-9-1.
const PROTOCOL: [(&str, &str); 1] = [("protocol", "amqp091")];

/// What the RabbitMQ families are made of, copied out of the broker.
#[derive(Debug)]
pub struct NodeFigures {
    pub node: String,
    pub cluster: String,
    pub connections: u64,
    pub channels: u64,
    pub consumers: u64,
    pub resident_memory_bytes: Option<u64>,
    pub memory_limit_bytes: u64,
    pub disk_free_bytes: Option<u64>,
    pub disk_free_limit_bytes: u64,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub uptime_seconds: f64,
    /// Broker-wide message counts (deleted queues included).
    pub counts: MessageCounts,
    pub lifecycle: LifecycleCounts,
    pub publishes: PublishCounts,
}

fn gauge<N: Into<f64> + Copy>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: &[(&str, &str)],
    value: N,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    if labels.is_empty() {
        // `name value`, not `name{} value`.
        ConstGauge::new(value.into()).encode(family)
    } else {
        ConstGauge::new(value.into()).encode(family.encode_family(&labels)?)
    }
}

/// `name` without `_total`, which the encoder adds to a counter; with
/// the `protocol` label or none.
fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
    with_protocol: bool,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    if with_protocol {
        ConstCounter::new(value).encode(family.encode_family(&PROTOCOL)?)
    } else {
        ConstCounter::new(value).encode(family)
    }
}

/// `rabbitmq_message_size_bytes`: the body sizes of the messages received,
/// in RabbitMQ's buckets.
fn encode_message_sizes(
    publishes: &PublishCounts,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        "rabbitmq_message_size_bytes",
        "Size of messages received from publishers",
        None,
        MetricType::Histogram,
    )?;
    // The encoder adds the bucket counts up itself; the last bound is its
    // way of writing +Inf.
    let buckets: Vec<(f64, u64)> = MESSAGE_SIZE_BUCKETS
        .iter()
        .map(|bound| *bound as f64)
        .chain(std::iter::once(f64::MAX))
        .zip(publishes.sizes)
        .collect();
    let count = publishes.sizes.iter().sum();
    family
        .encode_family(&PROTOCOL)?
        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            publishes.size_sum as f64,
            count,
            &buckets,
            None,
        )
}

/// `rabbitmq_identity_info` and `rabbitmq_build_info`, which every
/// endpoint serves.
pub fn encode_identity(
    figures: &NodeFigures,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    gauge(
        encoder,
        "rabbitmq_identity_info",
        "RabbitMQ node & cluster identity info",
        &[
            ("rabbitmq_node", figures.node.as_str()),
            ("rabbitmq_cluster", figures.cluster.as_str()),
        ],
        1u32,
    )?;
    gauge(
        encoder,
        "rabbitmq_build_info",
        "RabbitMQ & Erlang/OTP version info",
        &[
            ("rabbitmq_version", warren_amqp::RABBITMQ_COMPATIBLE_VERSION),
            ("product_name", "Warren"),
            ("product_version", env!("CARGO_PKG_VERSION")),
        ],
        1u32,
    )
}

/// The node-wide families, the same aggregated and per object.
pub fn encode_node(
    figures: &NodeFigures,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let node_gauges: [(&str, &str, Option<f64>); 10] = [
        (
            "rabbitmq_connections",
            "Connections currently open",
            Some(figures.connections as f64),
        ),
        (
            "rabbitmq_channels",
            "Channels currently open",
            Some(figures.channels as f64),
        ),
        (
            "rabbitmq_consumers",
            "Consumers currently connected",
            Some(figures.consumers as f64),
        ),
        (
            "rabbitmq_process_resident_memory_bytes",
            "Memory used in bytes",
            figures.resident_memory_bytes.map(|bytes| bytes as f64),
        ),
        (
            "rabbitmq_resident_memory_limit_bytes",
            "Memory high watermark in bytes",
            Some(figures.memory_limit_bytes as f64),
        ),
        (
            "rabbitmq_disk_space_available_bytes",
            "Disk space available in bytes",
            figures.disk_free_bytes.map(|bytes| bytes as f64),
        ),
        (
            "rabbitmq_disk_space_available_limit_bytes",
            "Free disk space low watermark in bytes",
            Some(figures.disk_free_limit_bytes as f64),
        ),
        (
            "rabbitmq_process_open_fds",
            "Open file descriptors",
            figures.open_fds.map(|fds| fds as f64),
        ),
        (
            "rabbitmq_process_max_fds",
            "Open file descriptors limit",
            figures.max_fds.map(|fds| fds as f64),
        ),
        // Warren runs no Erlang VM; the node's uptime is what dashboards
        // read from this name.
        (
            "rabbitmq_erlang_uptime_seconds",
            "Node uptime",
            Some(figures.uptime_seconds),
        ),
    ];
    for (name, help, value) in node_gauges {
        if let Some(value) = value {
            gauge(encoder, name, help, &[], value)?;
        }
    }
    gauge(
        encoder,
        "rabbitmq_global_consumers",
        "Current number of consumers",
        &PROTOCOL,
        figures.consumers as f64,
    )?;
    gauge(
        encoder,
        "rabbitmq_global_publishers",
        "Current number of publishers",
        &PROTOCOL,
        figures.publishes.publishers as f64,
    )?;
    encode_message_sizes(&figures.publishes, encoder)?;
    let (counts, publishes) = (&figures.counts, &figures.publishes);
    let global: [(&str, &str, u64); 14] = [
        (
            "rabbitmq_global_messages_received",
            "Total number of messages received from publishers",
            counts.published,
        ),
        (
            "rabbitmq_global_messages_received_confirm",
            "Total number of messages received from publishers expecting confirmations",
            publishes.confirm_published,
        ),
        (
            "rabbitmq_global_messages_routed",
            "Total number of messages routed to queues or streams",
            counts.published.saturating_sub(counts.unroutable),
        ),
        (
            "rabbitmq_global_messages_unroutable_returned",
            "Total number of messages published as mandatory into an exchange and returned \
             to the publisher as unroutable",
            publishes.returned,
        ),
        (
            "rabbitmq_global_messages_unroutable_dropped",
            "Total number of messages published as non-mandatory into an exchange and \
             dropped as unroutable",
            counts.unroutable.saturating_sub(publishes.returned),
        ),
        (
            "rabbitmq_global_messages_confirmed",
            "Total number of messages confirmed to publishers",
            publishes.confirmed,
        ),
        (
            "rabbitmq_global_messages_delivered",
            "Total number of messages delivered to consumers",
            counts.delivered + counts.got,
        ),
        (
            "rabbitmq_global_messages_delivered_consume_auto_ack",
            "Total number of messages delivered to consumers using basic.consume with \
             automatic acknowledgment",
            counts.delivered_no_ack,
        ),
        (
            "rabbitmq_global_messages_delivered_consume_manual_ack",
            "Total number of messages delivered to consumers using basic.consume with \
             manual acknowledgment",
            counts.delivered.saturating_sub(counts.delivered_no_ack),
        ),
        (
            "rabbitmq_global_messages_delivered_get_auto_ack",
            "Total number of messages delivered to consumers using basic.get with \
             automatic acknowledgment",
            counts.got_no_ack,
        ),
        (
            "rabbitmq_global_messages_delivered_get_manual_ack",
            "Total number of messages delivered to consumers using basic.get with \
             manual acknowledgment",
            counts.got.saturating_sub(counts.got_no_ack),
        ),
        (
            "rabbitmq_global_messages_get_empty",
            "Total number of times basic.get operations fetched no message",
            counts.got_empty,
        ),
        (
            "rabbitmq_global_messages_redelivered",
            "Total number of messages redelivered to consumers",
            counts.redelivered,
        ),
        (
            "rabbitmq_global_messages_acknowledged",
            "Total number of messages acknowledged by consumers",
            counts.acked,
        ),
    ];
    for (name, help, value) in global {
        counter(encoder, name, help, value, true)?;
    }
    let lifecycle = &figures.lifecycle;
    let node_counters: [(&str, &str, u64); 7] = [
        (
            "rabbitmq_connections_opened",
            "Total number of connections opened",
            lifecycle.connections_opened,
        ),
        (
            "rabbitmq_connections_closed",
            "Total number of connections closed or terminated",
            lifecycle.connections_closed,
        ),
        (
            "rabbitmq_channels_opened",
            "Total number of channels opened",
            lifecycle.channels_opened,
        ),
        (
            "rabbitmq_channels_closed",
            "Total number of channels closed",
            lifecycle.channels_closed,
        ),
        (
            "rabbitmq_queues_declared",
            "Total number of queues declared",
            lifecycle.queues_declared,
        ),
        (
            "rabbitmq_queues_created",
            "Total number of queues created",
            lifecycle.queues_created,
        ),
        (
            "rabbitmq_queues_deleted",
            "Total number of queues deleted",
            lifecycle.queues_deleted,
        ),
    ];
    for (name, help, value) in node_counters {
        counter(encoder, name, help, value, false)?;
    }
    Ok(())
}

/// Which queue families `/metrics/detailed` was asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DetailedFamilies {
    /// `queue_coarse_metrics`: ready, unacknowledged and all messages.
    pub queue_coarse: bool,
    /// `queue_consumer_count`.
    pub queue_consumers: bool,
}

impl DetailedFamilies {
    /// From the `family` parameters; families Warren does not serve are
    /// left out.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut families = Self::default();
        for name in names {
            match name {
                "queue_coarse_metrics" => families.queue_coarse = true,
                "queue_consumer_count" => families.queue_consumers = true,
                _ => {}
            }
        }
        families
    }
}

type QueueValue = fn(&QueueInfo) -> u64;

/// The per-queue families of `/metrics/detailed`.
pub fn encode_detailed_queues(
    queues: &[QueueInfo],
    families: DetailedFamilies,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let mut chosen: Vec<(&str, &str, QueueValue)> = Vec::new();
    if families.queue_coarse {
        chosen.push((
            "rabbitmq_detailed_queue_messages_ready",
            "Messages ready to be delivered to consumers",
            |queue| queue.ready as u64,
        ));
        chosen.push((
            "rabbitmq_detailed_queue_messages_unacked",
            "Messages delivered to consumers but not yet acknowledged",
            |queue| queue.unacked as u64,
        ));
        chosen.push((
            "rabbitmq_detailed_queue_messages",
            "Sum of ready and unacknowledged messages - total queue depth",
            |queue| (queue.ready + queue.unacked) as u64,
        ));
    }
    if families.queue_consumers {
        chosen.push((
            "rabbitmq_detailed_queue_consumers",
            "Consumers on a queue",
            |queue| queue.consumers as u64,
        ));
    }
    for (name, help, value) in chosen {
        per_queue(encoder, name, help, queues, value)?;
    }
    Ok(())
}

/// One gauge family with a sample per queue, labelled `vhost` and `queue`.
fn per_queue(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    queues: &[QueueInfo],
    value: QueueValue,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for queue in queues {
        let labels = [
            ("vhost", queue.vhost.as_str()),
            ("queue", queue.name.as_str()),
        ];
        ConstGauge::new(value(queue) as f64).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The queue families: summed over the queues when aggregated, one
/// sample per queue otherwise.
pub fn encode_queues(
    queues: &[QueueInfo],
    per_object: bool,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    gauge(
        encoder,
        "rabbitmq_queues",
        "Queues available",
        &[],
        queues.len() as f64,
    )?;
    let families: [(&str, &str, QueueValue); 4] = [
        (
            "rabbitmq_queue_messages_ready",
            "Messages ready to be delivered to consumers",
            |queue| queue.ready as u64,
        ),
        (
            "rabbitmq_queue_messages_unacked",
            "Messages delivered to consumers but not yet acknowledged",
            |queue| queue.unacked as u64,
        ),
        (
            "rabbitmq_queue_messages",
            "Sum of ready and unacknowledged messages - total queue depth",
            |queue| (queue.ready + queue.unacked) as u64,
        ),
        (
            "rabbitmq_queue_consumers",
            "Consumers on a queue",
            |queue| queue.consumers as u64,
        ),
    ];
    for (name, help, value) in families {
        if per_object {
            per_queue(encoder, name, help, queues, value)?;
        } else {
            let total: u64 = queues.iter().map(value).sum();
            gauge(encoder, name, help, &[], total as f64)?;
        }
    }
    Ok(())
}
