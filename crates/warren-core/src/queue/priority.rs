//! The backlog of a priority queue (`x-max-priority`): one FIFO per
//! priority level, served highest first. Within a level, order is arrival
//! order and a requeued message goes back to its original place, as in a
//! plain queue.

use std::sync::Arc;

use warren_store::{Backlog, Sequence, SpillArea, SpillingBacklog};

use crate::queue::QueuedMessage;

pub struct PriorityBacklog {
    /// Index = priority level; a message above the maximum waits at the
    /// maximum (the queue clamps it before it gets here).
    /// Each level spills on its own, so a deep level keeps only its head
    /// in memory.
    levels: Vec<SpillingBacklog<QueuedMessage>>,
    len: usize,
}

impl PriorityBacklog {
    pub fn new(max_priority: u8, spill: Option<&Arc<SpillArea>>) -> Self {
        Self {
            levels: (0..=max_priority)
                .map(|_| SpillingBacklog::new(spill.cloned()))
                .collect(),
            len: 0,
        }
    }

    fn level_index(&self, message: &QueuedMessage) -> usize {
        (message.meta.priority as usize).min(self.levels.len() - 1)
    }

    fn level_of(&mut self, message: &QueuedMessage) -> &mut SpillingBacklog<QueuedMessage> {
        let index = self.level_index(message);
        &mut self.levels[index]
    }
}

impl Backlog<QueuedMessage> for PriorityBacklog {
    fn push_back(&mut self, sequence: Sequence, message: QueuedMessage) {
        self.len += 1;
        self.level_of(&message).push_back(sequence, message);
    }

    fn pop_front(&mut self) -> Option<(Sequence, QueuedMessage)> {
        let taken = self
            .levels
            .iter_mut()
            .rev()
            .find_map(|level| level.pop_front())?;
        self.len -= 1;
        Some(taken)
    }

    fn front(&self) -> Option<(Sequence, &QueuedMessage)> {
        self.levels.iter().rev().find_map(|level| level.front())
    }

    fn requeue(&mut self, sequence: Sequence, message: QueuedMessage) {
        self.len += 1;
        self.level_of(&message).requeue(sequence, message);
    }

    fn len(&self) -> usize {
        self.len
    }

    fn holds_in_memory(&self, next: &QueuedMessage) -> bool {
        self.levels[self.level_index(next)].holds_in_memory(next)
    }

    fn visit_head_mut(
        &mut self,
        count: usize,
        visit: &mut dyn FnMut(Sequence, &mut QueuedMessage),
    ) {
        let mut left = count;
        for level in self.levels.iter_mut().rev() {
            if left == 0 {
                break;
            }
            let here = left.min(level.len());
            level.visit_head_mut(here, visit);
            left -= here;
        }
    }

    fn get_mut(&mut self, sequence: Sequence) -> Option<&mut QueuedMessage> {
        self.levels
            .iter_mut()
            .find_map(|level| level.get_mut(sequence))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{MessageMeta, Stored};

    fn queued(priority: u8) -> QueuedMessage {
        QueuedMessage {
            message: None,
            stored: Stored::Nowhere,
            redelivered: false,
            meta: MessageMeta {
                priority,
                ..MessageMeta::RECOVERED
            },
            body_bytes: 0,
        }
    }

    #[test]
    fn higher_levels_first_and_fifo_within_a_level() {
        let mut backlog = PriorityBacklog::new(5, None);
        for (sequence, priority) in [(1, 0), (2, 5), (3, 2), (4, 5), (5, 0)] {
            backlog.push_back(sequence, queued(priority));
        }
        assert_eq!(backlog.len(), 5);
        let order: Vec<Sequence> = std::iter::from_fn(|| backlog.pop_front())
            .map(|(sequence, _)| sequence)
            .collect();
        assert_eq!(order, vec![2, 4, 3, 1, 5]);
        assert!(backlog.is_empty());
    }

    #[test]
    fn a_requeued_message_returns_to_its_place_in_its_level() {
        let mut backlog = PriorityBacklog::new(3, None);
        for sequence in 1..=3 {
            backlog.push_back(sequence, queued(3));
        }
        backlog.push_back(4, queued(1));
        let (first, message) = backlog.pop_front().unwrap();
        backlog.requeue(first, message);
        assert_eq!(backlog.front().map(|(sequence, _)| sequence), Some(1));
        assert_eq!(backlog.len(), 4);
    }
}
