//! RabbitMQ's per-vhost limits (`rabbitmqctl set_vhost_limits`,
//! `/api/vhost-limits`): at most so many client connections and so many
//! queues in a vhost. They are kept with the vhost; the AMQP server checks
//! the first when a connection opens the vhost and the broker the second
//! when a queue is declared in it.

use std::collections::BTreeMap;

/// A vhost's limits; None is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VhostLimits {
    pub max_connections: Option<u64>,
    pub max_queues: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// RabbitMQ's text for a limit it does not know.
    #[error("Unrecognised terms [{name}] in limits")]
    Unknown { name: String },
}

impl VhostLimits {
    /// The limits' names, as RabbitMQ's API and definitions give them.
    pub const NAMES: [&'static str; 2] = ["max-connections", "max-queues"];

    /// Sets one limit; a negative value lifts it, as in RabbitMQ.
    pub fn set(&mut self, name: &str, value: i64) -> Result<(), LimitError> {
        let value = u64::try_from(value).ok();
        match name {
            "max-connections" => self.max_connections = value,
            "max-queues" => self.max_queues = value,
            other => {
                return Err(LimitError::Unknown {
                    name: other.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// The limits set, by name.
    pub fn by_name(&self) -> BTreeMap<&'static str, u64> {
        [
            ("max-connections", self.max_connections),
            ("max-queues", self.max_queues),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|value| (name, value)))
        .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.max_connections.is_none() && self.max_queues.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_set_lifted_and_named_as_rabbitmq_does() {
        let mut limits = VhostLimits::default();
        limits.set("max-queues", 5).unwrap();
        limits.set("max-connections", 0).unwrap();
        assert_eq!(limits.max_queues, Some(5));
        assert_eq!(limits.max_connections, Some(0), "0 allows none");
        assert_eq!(
            limits.by_name().into_iter().collect::<Vec<_>>(),
            vec![("max-connections", 0), ("max-queues", 5)]
        );
        limits.set("max-queues", -1).unwrap();
        assert_eq!(limits.max_queues, None);
        assert_eq!(
            limits.set("max-foo", 1).unwrap_err().to_string(),
            "Unrecognised terms [max-foo] in limits"
        );
    }
}
