//! The store's slow work, on a thread of its own, off the broker's locks:
//! reading paged-out messages back ahead of their queues' consumers (the
//! lock is taken only to put them in place), and telling the log that the
//! messages of a purged or deleted queue are gone.
//!
//! A queue asks for at most one read-ahead at a time (see
//! `warren_core::Queue::read_ahead`), and a discard is asked for once per
//! purge or deletion, so what waits here is bounded by the queues and by
//! the operations clients make.

use std::sync::mpsc;

use warren_core::codec::decode_stored_message;
use warren_core::{Discard, ReadAhead};
use warren_store::LogHandle;

use crate::hub::{SharedHub, WeakHub};

/// Work for the store's thread.
pub(crate) enum StoreWork {
    ReadAhead(ReadAhead),
    Discard(Discard),
}

/// Starts the thread for the hub's message log, if it has one, and tells
/// the broker to hand it its slow work.
pub(crate) fn start(hub: &SharedHub) -> std::io::Result<()> {
    let mut locked = hub.lock();
    let Some(log) = locked.broker.message_log().map(|log| log.handle()) else {
        return Ok(());
    };
    let (work, received) = mpsc::channel();
    let weak = hub.downgrade();
    std::thread::Builder::new()
        .name("warren-store-worker".into())
        .spawn(move || run(&log, &weak, &received))?;
    locked.set_store_worker(work);
    locked.broker.enable_store_worker();
    Ok(())
}

/// Serves work until the hub is gone.
fn run(log: &LogHandle, hub: &WeakHub, work: &mpsc::Receiver<StoreWork>) {
    while let Ok(item) = work.recv() {
        match item {
            StoreWork::ReadAhead(request) => {
                if !read_ahead(log, hub, request) {
                    return;
                }
            }
            StoreWork::Discard(discard) => discard.run(log),
        }
    }
}

/// Reads the messages and installs them; false once the hub is gone.
fn read_ahead(log: &LogHandle, hub: &WeakHub, request: ReadAhead) -> bool {
    // A record that cannot be read or decoded is left where it is: the
    // queue reads it again when it reaches the head, and reports it there.
    let locations: Vec<_> = request
        .reads
        .iter()
        .map(|&(_, location)| location)
        .collect();
    let loaded = request
        .reads
        .iter()
        .zip(log.read_many(&locations))
        .filter_map(|(&(sequence, _), payload)| {
            let (message, arrived_ms) = decode_stored_message(&payload.ok()?).ok()?;
            Some((sequence, message, arrived_ms))
        })
        .collect();
    let Some(hub) = hub.upgrade() else {
        return false;
    };
    hub.read().broker.install_read_ahead(request.queue, loaded);
    true
}
