//! Reads paged-out messages back ahead of their queues' consumers, on a
//! thread of its own, so that the disk read happens outside the hub's lock;
//! the lock is taken only to put the messages in place.
//!
//! A queue asks for at most one read-ahead at a time (see
//! `warren_core::Queue::read_ahead`), so the requests waiting here are at
//! most one per queue.

use std::sync::mpsc;

use warren_core::ReadAhead;
use warren_core::codec::decode_stored_message;
use warren_store::LogReader;

use crate::hub::{SharedHub, WeakHub};

/// Starts the reader for the hub's message log, if it has one, and tells
/// the broker to ask it for read-aheads.
pub(crate) fn start(hub: &SharedHub) -> std::io::Result<()> {
    let mut locked = hub.lock();
    let Some(log) = locked.broker.message_log().map(|log| log.reader()) else {
        return Ok(());
    };
    let (requests, received) = mpsc::channel();
    let weak = hub.downgrade();
    std::thread::Builder::new()
        .name("warren-read-ahead".into())
        .spawn(move || run(&log, &weak, &received))?;
    locked.set_read_ahead(requests);
    locked.broker.enable_read_ahead();
    Ok(())
}

/// Serves requests until the hub is gone.
fn run(log: &LogReader, hub: &WeakHub, requests: &mpsc::Receiver<ReadAhead>) {
    while let Ok(request) = requests.recv() {
        // A record that cannot be read or decoded is left where it is:
        // the queue reads it again when it reaches the head, and reports
        // it there.
        let loaded = request
            .reads
            .iter()
            .filter_map(|&(sequence, location)| {
                let payload = log.read(location).ok()?;
                let (message, arrived_ms) = decode_stored_message(&payload).ok()?;
                Some((sequence, message, arrived_ms))
            })
            .collect();
        let Some(hub) = hub.upgrade() else {
            return;
        };
        hub.lock().broker.install_read_ahead(request.queue, loaded);
    }
}
