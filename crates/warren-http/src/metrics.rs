//! `GET /metrics`: Prometheus text format, encoded by `prometheus-client`
//! from a snapshot of the broker taken at scrape time: RabbitMQ's
//! families under RabbitMQ's names, aggregated (see
//! [`crate::rabbitmq_metrics`]), then Warren's own `warren_*` families.
//! `GET /metrics/per-object` gives RabbitMQ's families with one sample
//! per queue.

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use warren_amqp::alarms::Alarms;
use warren_core::{DELIVERY_COUNT_BUCKETS, QueueInfo};
use warren_store::CommitTimesSnapshot;

use crate::backlog::{self, Backlog};
use crate::error::ApiError;
use crate::models::{HistogramView, ModelStatus};
use crate::rabbitmq_metrics::{self, DetailedFamilies, NodeFigures};
use crate::state::AppState;

/// Everything one scrape reports, copied out of the broker first so that
/// encoding happens without its lock.
#[derive(Debug)]
struct Snapshot {
    queues: Vec<QueueInfo>,
    connections: usize,
    channels: usize,
    consumers: usize,
    resident_memory_bytes: Option<u64>,
    disk_free_bytes: Option<u64>,
    store_bytes: Option<u64>,
    memory_limit_bytes: u64,
    alarms: Alarms,
    commit_times: Option<CommitTimesSnapshot>,
    models: Vec<ModelStatus>,
    /// Each model's backlog, in the order of `models`.
    backlogs: Vec<Backlog>,
    node: NodeFigures,
    view: View,
}

/// Which families a scrape serves.
#[derive(Debug, Clone, Copy)]
enum View {
    /// RabbitMQ's, aggregated, then Warren's own (`/metrics`).
    Aggregated,
    /// RabbitMQ's with one sample per queue (`/metrics/per-object`).
    PerObject,
    /// The families asked for, per queue (`/metrics/detailed`).
    Detailed(DetailedFamilies),
}

pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    scrape(&state, View::Aggregated, None)
}

/// `GET /metrics/per-object`.
pub async fn per_object(State(state): State<AppState>) -> Result<Response, ApiError> {
    scrape(&state, View::PerObject, None)
}

/// `GET /metrics/detailed?family=...&vhost=...`: each parameter may be
/// given more than once; without `vhost`, every vhost.
pub async fn detailed(
    State(state): State<AppState>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let named = |key: &str| -> Vec<&str> {
        pairs
            .iter()
            .filter(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
            .collect()
    };
    let families = DetailedFamilies::from_names(named("family"));
    let vhosts: Vec<String> = named("vhost").into_iter().map(str::to_owned).collect();
    let vhosts = (!vhosts.is_empty()).then_some(vhosts);
    scrape(&state, View::Detailed(families), vhosts)
}

fn scrape(state: &AppState, view: View, vhosts: Option<Vec<String>>) -> Result<Response, ApiError> {
    // Files, /proc and the models are read before taking the broker lock.
    let resident_memory_bytes = resident_memory_bytes();
    let (open_fds, max_fds) = crate::api::nodes::file_descriptors();
    let store_bytes = state.node.data_dir.as_deref().map(directory_bytes);
    let models = state.models.models();
    let backlogs = models
        .iter()
        .map(|model| backlog::of_model(state, model))
        .collect();
    let snapshot = {
        let hub = state.hub.read();
        let totals = hub.broker().totals();
        let log = hub.broker().message_log();
        let disk_free_bytes = log.and_then(|log| log.available_bytes().ok());
        let node = NodeFigures {
            node: state.node.name.clone(),
            cluster: state.node.cluster_name(),
            connections: totals.connections as u64,
            channels: totals.channels as u64,
            consumers: totals.consumers as u64,
            resident_memory_bytes,
            memory_limit_bytes: state.hub.memory().limit_bytes(),
            disk_free_bytes,
            disk_free_limit_bytes: state.node.disk_free_limit_bytes,
            open_fds,
            max_fds,
            uptime_seconds: state.node.started.elapsed().as_secs_f64(),
            counts: totals.counts,
            lifecycle: totals.lifecycle,
            publishes: state.hub.publish_counts(),
        };
        Snapshot {
            queues: hub
                .broker()
                .queue_infos(None)
                .into_iter()
                .filter(|queue| {
                    vhosts
                        .as_ref()
                        .is_none_or(|vhosts| vhosts.contains(&queue.vhost))
                })
                .collect(),
            connections: totals.connections,
            channels: totals.channels,
            consumers: totals.consumers,
            resident_memory_bytes,
            disk_free_bytes,
            store_bytes,
            memory_limit_bytes: state.hub.memory().limit_bytes(),
            alarms: state.hub.alarms(),
            commit_times: log.map(|log| log.commit_times()),
            models,
            backlogs,
            node,
            view,
        }
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut openmetrics = String::new();
    prometheus_client::encoding::text::encode(&mut openmetrics, &registry)
        .map_err(|_| ApiError::Internal("encoding the metrics failed".to_owned()))?;
    let mut response = prometheus_text(&openmetrics).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        rabbitmq_metrics::encode_identity(&self.node, &mut encoder)?;
        match self.view {
            View::Detailed(families) => {
                return rabbitmq_metrics::encode_detailed_queues(
                    &self.queues,
                    families,
                    &mut encoder,
                );
            }
            View::PerObject => {
                rabbitmq_metrics::encode_node(&self.node, &mut encoder)?;
                return rabbitmq_metrics::encode_queues(&self.queues, true, &mut encoder);
            }
            View::Aggregated => {
                rabbitmq_metrics::encode_node(&self.node, &mut encoder)?;
                rabbitmq_metrics::encode_queues(&self.queues, false, &mut encoder)?;
            }
        }
        type QueueValue = fn(&QueueInfo) -> u64;
        let queue_gauges: [(&str, &str, QueueValue); 4] = [
            (
                "warren_queue_messages_ready",
                "Messages waiting in the queue.",
                |q| q.ready as u64,
            ),
            (
                "warren_queue_messages_unacked",
                "Messages delivered and not yet acknowledged.",
                |q| q.unacked as u64,
            ),
            ("warren_queue_consumers", "Consumers of the queue.", |q| {
                q.consumers as u64
            }),
            (
                "warren_queue_message_bytes_ready",
                "Body bytes of the waiting messages.",
                |q| q.ready_bytes,
            ),
        ];
        for (name, help, value) in queue_gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for queue in &self.queues {
                let labels = [
                    ("vhost", queue.vhost.as_str()),
                    ("queue", queue.name.as_str()),
                ];
                ConstGauge::new(value(queue) as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        let queue_counters: [(&str, &str, QueueValue); 4] = [
            (
                "warren_queue_messages_published",
                "Messages that entered the queue.",
                |q| q.counts.published,
            ),
            (
                "warren_queue_messages_delivered",
                "Messages delivered to consumers or got.",
                |q| q.counts.delivered + q.counts.got,
            ),
            (
                "warren_queue_messages_acked",
                "Deliveries acknowledged.",
                |q| q.counts.acked,
            ),
            (
                "warren_queue_messages_redelivered",
                "Deliveries of messages delivered before.",
                |q| q.counts.redelivered,
            ),
        ];
        for (name, help, value) in queue_counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for queue in &self.queues {
                let labels = [
                    ("vhost", queue.vhost.as_str()),
                    ("queue", queue.name.as_str()),
                ];
                ConstCounter::new(value(queue)).encode(family.encode_family(&labels)?)?;
            }
        }
        // How long the head has waited and the oldest delivery has been
        // out; a queue with neither has no sample.
        let now_ms = warren_amqp::wall_clock_ms();
        type QueueAge = fn(&QueueInfo) -> Option<u64>;
        let queue_ages: [(&str, &str, QueueAge); 2] = [
            (
                "warren_queue_oldest_ready_age_seconds",
                "How long the message at the head of the queue has waited.",
                |q| q.head_arrived_ms,
            ),
            (
                "warren_queue_oldest_unacked_age_seconds",
                "How long the oldest unacknowledged delivery has been out.",
                |q| q.oldest_unacked_ms,
            ),
        ];
        for (name, help, since) in queue_ages {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for queue in &self.queues {
                let Some(since_ms) = since(queue) else {
                    continue;
                };
                let labels = [
                    ("vhost", queue.vhost.as_str()),
                    ("queue", queue.name.as_str()),
                ];
                let age_s = now_ms.saturating_sub(since_ms) as f64 / 1000.0;
                ConstGauge::new(age_s).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "warren_queue_message_deliveries",
            "How many times each message the queue let go had been delivered.",
            None,
            MetricType::Histogram,
        )?;
        for queue in &self.queues {
            let labels = [
                ("vhost", queue.vhost.as_str()),
                ("queue", queue.name.as_str()),
            ];
            let counts = &queue.delivery_counts;
            let buckets: Vec<(f64, u64)> = DELIVERY_COUNT_BUCKETS
                .iter()
                .map(|bound| f64::from(*bound))
                .chain(std::iter::once(f64::MAX))
                .zip(counts.buckets)
                .collect();
            family
                .encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    counts.deliveries as f64,
                    counts.buckets.iter().sum(),
                    &buckets,
                    None,
                )?;
        }
        let gauges = [
            (
                "warren_connections",
                "Open AMQP connections.",
                Some(self.connections as u64),
            ),
            (
                "warren_channels",
                "Open AMQP channels.",
                Some(self.channels as u64),
            ),
            ("warren_queues", "Queues.", Some(self.queues.len() as u64)),
            (
                "warren_consumers",
                "Consumers.",
                Some(self.consumers as u64),
            ),
            (
                "warren_process_resident_memory_bytes",
                "The broker's resident memory.",
                self.resident_memory_bytes,
            ),
            (
                "warren_disk_free_bytes",
                "Free space where the broker keeps its data.",
                self.disk_free_bytes,
            ),
            (
                "warren_store_bytes",
                "Bytes of the broker's data directory.",
                self.store_bytes,
            ),
            (
                "warren_memory_high_watermark_bytes",
                "Resident memory above which publishers are blocked.",
                Some(self.memory_limit_bytes),
            ),
            (
                "warren_memory_alarm",
                "1 while resident memory is over the high watermark.",
                Some(u64::from(self.alarms.memory)),
            ),
            (
                "warren_disk_alarm",
                "1 while free disk space is under its limit.",
                Some(u64::from(self.alarms.disk)),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(value as i64).encode(family)?;
            }
        }
        if let Some(commit_times) = &self.commit_times {
            let family = encoder.encode_descriptor(
                "warren_fsync_seconds",
                "Time to write and fsync one group commit of the message store.",
                None,
                MetricType::Histogram,
            )?;
            encode_histogram(
                family,
                &HistogramView {
                    buckets: commit_times.buckets.clone(),
                    count: commit_times.count,
                    sum: commit_times.sum_us,
                },
                1e-6,
            )?;
        }
        self.encode_models(&mut encoder)
    }
}

impl Snapshot {
    fn encode_models(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.models.is_empty() {
            return Ok(());
        }
        type ModelValue = fn(&ModelStatus) -> u64;
        let counters: [(&str, &str, ModelValue); 5] = [
            (
                "warren_model_requests",
                "Requests the model's workers took.",
                |m| m.stats.requests,
            ),
            (
                "warren_model_replies",
                "Replies published and confirmed.",
                |m| m.stats.replies,
            ),
            (
                "warren_model_poison",
                "Requests dead-lettered as undecodable.",
                |m| m.stats.poison,
            ),
            (
                "warren_model_expired",
                "Requests dead-lettered because they expired before the model ran them.",
                |m| m.stats.expired,
            ),
            (
                "warren_model_failed_batches",
                "Batches whose inference failed.",
                |m| m.stats.failed_batches,
            ),
        ];
        for (name, help, value) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for model in &self.models {
                let labels = [("model", model.name.as_str())];
                ConstCounter::new(value(model)).encode(family.encode_family(&labels)?)?;
            }
        }
        type BacklogValue = fn(&Backlog) -> f64;
        let gauges: [(&str, &str, BacklogValue); 2] = [
            (
                "warren_model_service_rate",
                "Requests the model's workers answered per second, over the last 5 s.",
                |backlog| backlog.service_rate,
            ),
            (
                "warren_model_drain_seconds",
                "Expected seconds to empty the model's queue at its service rate \
                 (+Inf while requests wait and none is answered).",
                |backlog| backlog.drain_seconds.unwrap_or(f64::INFINITY),
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (model, backlog) in self.models.iter().zip(&self.backlogs) {
                let labels = [("model", model.name.as_str())];
                ConstGauge::new(value(backlog)).encode(family.encode_family(&labels)?)?;
            }
        }
        type ModelHistogram = fn(&ModelStatus) -> &HistogramView;
        let histograms: [(&str, &str, ModelHistogram, f64); 4] = [
            (
                "warren_model_batch_size",
                "Requests per inference batch.",
                |m| &m.stats.batch_size,
                1.0,
            ),
            (
                "warren_model_batch_wait_seconds",
                "How long a batch's first request waited for the batch to fill.",
                |m| &m.stats.batch_wait_us,
                1e-6,
            ),
            (
                "warren_model_queue_wait_seconds",
                "How long requests waited in the queue before a worker took them.",
                |m| &m.stats.queue_wait_us,
                1e-6,
            ),
            (
                "warren_model_inference_seconds",
                "Time of one batch's inference.",
                |m| &m.stats.inference_us,
                1e-6,
            ),
        ];
        for (name, help, histogram, scale) in histograms {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for model in &self.models {
                let labels = [("model", model.name.as_str())];
                encode_histogram(family.encode_family(&labels)?, histogram(model), scale)?;
            }
        }
        Ok(())
    }
}

/// A fixed-bucket histogram in Prometheus form; `scale` turns its unit
/// into the metric's (µs into seconds).
fn encode_histogram(
    mut encoder: prometheus_client::encoding::MetricEncoder,
    histogram: &HistogramView,
    scale: f64,
) -> Result<(), std::fmt::Error> {
    let buckets: Vec<(f64, u64)> = histogram
        .buckets
        .iter()
        .map(|(bound, count)| (bound.map_or(f64::MAX, |bound| bound as f64 * scale), *count))
        .collect();
    encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        histogram.sum as f64 * scale,
        histogram.count,
        &buckets,
        None,
    )
}

/// The process's resident set: `VmRSS` from /proc/self/status (Linux),
/// which the kernel gives in kB whatever the page size.
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?;
    let kilobytes: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kilobytes * 1024)
}

/// Bytes of the files under a directory (the message log's segments and
/// the topology file).
fn directory_bytes(directory: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => directory_bytes(&entry.path()),
            Ok(metadata) => metadata.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The Prometheus text format (0.0.4, what `/metrics` says it serves, as
/// RabbitMQ's does) of what `prometheus-client` encodes as OpenMetrics:
/// a counter's HELP and TYPE name its samples' `_total` name, and there
/// is no `# UNIT` or `# EOF` line. Everything else is the same in both.
fn prometheus_text(openmetrics: &str) -> String {
    let mut text = String::with_capacity(openmetrics.len());
    let lines: Vec<&str> = openmetrics.lines().collect();
    for (index, line) in lines.iter().enumerate() {
        if *line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let metadata = line
            .strip_prefix("# HELP ")
            .map(|rest| ("# HELP ", rest))
            .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("# TYPE ", rest)));
        let Some((kind, rest)) = metadata else {
            text.push_str(line);
            text.push('\n');
            continue;
        };
        let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        // The family's type is on its TYPE line, the HELP line's
        // neighbour.
        let type_line = format!("# TYPE {name} counter");
        let is_counter = lines
            .get(index..(index + 2).min(lines.len()))
            .is_some_and(|near| near.iter().any(|near| *near == type_line));
        text.push_str(kind);
        text.push_str(name);
        if is_counter && !name.ends_with("_total") {
            text.push_str("_total");
        }
        if !tail.is_empty() {
            text.push(' ');
            text.push_str(tail);
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::prometheus_text;

    #[test]
    fn counters_are_named_by_their_samples_and_openmetrics_lines_go() {
        let openmetrics = "# HELP jobs Jobs done.\n# TYPE jobs counter\njobs_total 3\n\
                           # HELP depth Queue depth.\n# TYPE depth gauge\n# UNIT depth messages\n\
                           depth{queue=\"q\"} 2\n# EOF\n";
        assert_eq!(
            prometheus_text(openmetrics),
            "# HELP jobs_total Jobs done.\n# TYPE jobs_total counter\njobs_total 3\n\
             # HELP depth Queue depth.\n# TYPE depth gauge\ndepth{queue=\"q\"} 2\n"
        );
    }
}
