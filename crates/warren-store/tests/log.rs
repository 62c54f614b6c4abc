//! The message log on a simulated disk: durability, recovery from torn and
//! corrupt records, space reclamation, failure poisoning, and a property test
//! against a model (a VecDeque per queue) over random operations and crashes.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use proptest::prelude::*;
use warren_store::{
    FileSystem, Location, LogConfig, MessageLog, RecordKind, Recovery, SimulatedFileSystem,
    StoreError, Ticket,
};

const DIR: &str = "/data/messages";

/// What the log's listener has reported.
#[derive(Default)]
struct Reports {
    durable: Mutex<(Ticket, Option<StoreError>)>,
    changed: Condvar,
}

impl Reports {
    fn wait_durable(&self, ticket: Ticket) -> Result<(), StoreError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut state = self.durable.lock();
        loop {
            if let Some(error) = &state.1 {
                return Err(error.clone());
            }
            if state.0 >= ticket {
                return Ok(());
            }
            assert!(
                !self.changed.wait_until(&mut state, deadline).timed_out(),
                "ticket {ticket} not durable within 10 s"
            );
        }
    }

    fn wait_error(&self) -> StoreError {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut state = self.durable.lock();
        while state.1.is_none() {
            assert!(
                !self.changed.wait_until(&mut state, deadline).timed_out(),
                "no error reported"
            );
        }
        state.1.clone().expect("checked")
    }
}

fn config() -> LogConfig {
    LogConfig {
        segment_size_bytes: 4096,
        pending_bytes_max: 1 << 20,
        idle_roll_after: Duration::from_millis(20),
        // The tests compact when they choose to (`compact_now`).
        compaction_interval: None,
        compaction_min_dead_bytes: 1,
    }
}

fn open(fs: &Arc<SimulatedFileSystem>) -> (MessageLog, Recovery, Arc<Reports>) {
    let reports = Arc::new(Reports::default());
    let listener_reports = Arc::clone(&reports);
    let listener = Box::new(move |result: Result<Ticket, StoreError>| {
        let mut state = listener_reports.durable.lock();
        match result {
            Ok(ticket) => state.0 = ticket,
            Err(error) => state.1 = Some(error),
        }
        listener_reports.changed.notify_all();
    });
    let fs_dyn: Arc<dyn FileSystem> = fs.clone();
    let (log, recovery) =
        MessageLog::open(fs_dyn, Path::new(DIR), config(), listener).expect("open");
    (log, recovery, reports)
}

fn publish(log: &MessageLog, queue: u64, sequence: u64, payload: &[u8]) -> (Location, Ticket) {
    log.append_message(RecordKind::Publish, queue, sequence, payload)
        .expect("append")
}

fn recovered_sequences(recovery: &Recovery, queue: u64) -> Vec<u64> {
    recovery
        .queues
        .get(&queue)
        .map(|messages| messages.iter().map(|message| message.sequence).collect())
        .unwrap_or_default()
}

fn segment_path(segment: u64) -> std::path::PathBuf {
    Path::new(DIR).join(format!("{segment:020}.seg"))
}

#[test]
fn durable_messages_survive_a_crash_and_read_back() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    let (first, _) = publish(&log, 1, 1, b"one");
    let (_, ticket) = publish(&log, 1, 2, b"two");
    assert_eq!(&log.read(first).unwrap()[..], b"one");
    reports.wait_durable(ticket).unwrap();
    log.abandon();
    fs.crash(|unsynced| unsynced);

    let (log, recovery, _) = open(&fs);
    assert!(!recovery.clean_shutdown);
    assert_eq!(recovered_sequences(&recovery, 1), [1, 2]);
    let messages = &recovery.queues[&1];
    assert!(
        messages.iter().all(|message| message.delivered),
        "after a crash every message may have been delivered"
    );
    assert_eq!(&log.read(messages[1].location).unwrap()[..], b"two");
}

/// A large body is written from the caller's buffer, between small records
/// encoded into the log's own: it reads back whole before and after the
/// write, and survives a crash, with the records around it.
#[test]
fn a_large_body_written_from_its_own_buffer_reads_back_and_survives_a_crash() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    let body = bytes::Bytes::from(
        (0..200_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let (before, _) = publish(&log, 1, 1, b"before");
    let (large, _) = log
        .append_message_with_tail(RecordKind::Publish, 1, 2, b"head:", &body)
        .expect("append");
    let (after, ticket) = publish(&log, 1, 3, b"after");
    let expected: Vec<u8> = b"head:".iter().chain(body.iter()).copied().collect();
    assert_eq!(
        &log.read(large).unwrap()[..],
        &expected[..],
        "read before the write"
    );
    reports.wait_durable(ticket).unwrap();
    assert_eq!(
        &log.read(large).unwrap()[..],
        &expected[..],
        "read from the disk"
    );
    log.abandon();
    fs.crash(|unsynced| unsynced);

    let (log, recovery, _) = open(&fs);
    assert_eq!(recovered_sequences(&recovery, 1), [1, 2, 3]);
    let messages = &recovery.queues[&1];
    assert_eq!(&log.read(messages[0].location).unwrap()[..], b"before");
    assert_eq!(&log.read(messages[1].location).unwrap()[..], &expected[..]);
    assert_eq!(&log.read(messages[2].location).unwrap()[..], b"after");
    assert_eq!(
        (messages[0].location, messages[2].location),
        (before, after)
    );
}

#[test]
fn after_a_clean_shutdown_only_delivered_messages_are_marked() {
    let fs = SimulatedFileSystem::new();
    let (log, _, _) = open(&fs);
    let (first, _) = publish(&log, 1, 1, b"one");
    publish(&log, 1, 2, b"two");
    log.append_delivered(1, 1, first).unwrap();
    log.close().unwrap();

    let (_, recovery, _) = open(&fs);
    assert!(recovery.clean_shutdown);
    let delivered: Vec<bool> = recovery.queues[&1]
        .iter()
        .map(|message| message.delivered)
        .collect();
    assert_eq!(delivered, [true, false]);
}

#[test]
fn removed_messages_do_not_come_back() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    let (first, _) = publish(&log, 1, 1, b"one");
    publish(&log, 1, 2, b"two");
    let ticket = log.append_remove(1, 1, first).unwrap();
    reports.wait_durable(ticket).unwrap();
    log.abandon();
    fs.crash(|_| 0);
    let (_, recovery, _) = open(&fs);
    assert_eq!(recovered_sequences(&recovery, 1), [2]);
}

#[test]
fn a_torn_last_record_is_dropped_and_the_rest_recovered() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    let (location, ticket) = publish(&log, 1, 1, b"whole");
    reports.wait_durable(ticket).unwrap();
    log.abandon();
    // Half a record at the end, as a crash in the middle of a write leaves.
    let mut torn = Vec::new();
    warren_store::record::encode(&mut torn, RecordKind::Publish, 1, 2, b"cut short");
    let path = segment_path(location.segment);
    fs.append(&path, &torn[..torn.len() / 2]).unwrap();
    let (log, recovery, reports) = open(&fs);
    assert_eq!(recovery.torn_records_dropped, 1);
    assert_eq!(recovered_sequences(&recovery, 1), [1]);
    assert_eq!(
        fs.file_length(&path),
        Some(location.length as usize),
        "the torn tail is truncated"
    );
    // The log carries on writing after recovery.
    let (_, ticket) = publish(&log, 1, 3, b"after");
    reports.wait_durable(ticket).unwrap();
}

#[test]
fn a_record_with_a_bad_checksum_is_skipped_not_fatal() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    let mut last = 0;
    let mut locations = Vec::new();
    for sequence in 1..=3 {
        let (location, ticket) = publish(&log, 1, sequence, b"payload");
        locations.push(location);
        last = ticket;
    }
    reports.wait_durable(last).unwrap();
    log.abandon();
    let middle = locations[1];
    fs.corrupt(&segment_path(middle.segment), middle.offset as usize + 20);
    let (_, recovery, _) = open(&fs);
    assert_eq!(recovery.corrupt_records_skipped, 1);
    assert_eq!(recovered_sequences(&recovery, 1), [1, 3]);
}

#[test]
fn segments_whose_messages_are_all_removed_are_deleted() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    let payload = vec![7u8; 1000];
    let mut published = Vec::new();
    let mut ticket = 0;
    for sequence in 1..=20 {
        let (location, t) = publish(&log, 1, sequence, &payload);
        published.push((sequence, location));
        ticket = t;
    }
    reports.wait_durable(ticket).unwrap();
    assert!(
        log.segment_count() >= 5,
        "20 KB in 4 KiB segments: {}",
        log.segment_count()
    );
    for (sequence, location) in published {
        ticket = log.append_remove(1, sequence, location).unwrap();
    }
    reports.wait_durable(ticket).unwrap();
    // The quiet log rolls its last segment and deletes it too: an idle
    // store keeps no dead segment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while log.segment_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "segments left: {}",
            log.segment_count()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    log.close().unwrap();
    let files = fs.list(Path::new(DIR)).unwrap();
    assert!(
        files.iter().all(|name| !name.ends_with(".seg")),
        "files left: {files:?}"
    );
}

#[test]
fn a_segment_emptied_before_its_tail_is_written_is_not_deleted_early() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    // Hold the commit thread inside its first commit, then fill segment 1,
    // roll into later segments and remove everything before any of it is
    // written: segment 1 is dead while its tail still waits in memory.
    fs.pause_syncs();
    let payload = vec![3u8; 1000];
    let mut published = vec![(1, publish(&log, 1, 1, &payload).0)];
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs.syncs_waiting() == 0 {
        assert!(
            Instant::now() < deadline,
            "the commit thread never reached its fsync"
        );
        std::thread::yield_now();
    }
    for sequence in 2..=12 {
        published.push((sequence, publish(&log, 1, sequence, &payload).0));
    }
    let mut ticket = 0;
    for (sequence, location) in published {
        ticket = log.append_remove(1, sequence, location).unwrap();
    }
    fs.resume_syncs();
    reports.wait_durable(ticket).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let files: Vec<String> = fs
            .list(Path::new(DIR))
            .unwrap()
            .into_iter()
            .filter(|name| name.ends_with(".seg"))
            .collect();
        if files.is_empty() && log.segment_count() == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dead segment files left behind: {files:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_segment_holding_removes_for_a_live_older_segment_is_kept() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    let payload = vec![1u8; 1500];
    let (stuck, _) = publish(&log, 1, 1, &payload);
    let (second, _) = publish(&log, 1, 2, &payload);
    // Fill later segments, then remove message 2 from a later segment.
    let mut later = Vec::new();
    for sequence in 3..=8 {
        later.push((sequence, publish(&log, 1, sequence, &payload).0));
    }
    let mut ticket = log.append_remove(1, 2, second).unwrap();
    for (sequence, location) in later {
        ticket = log.append_remove(1, sequence, location).unwrap();
    }
    reports.wait_durable(ticket).unwrap();
    log.abandon();
    fs.crash(|_| 0);
    // Message 1 survives; message 2's removal was not lost with a deleted segment.
    let (_, recovery, _) = open(&fs);
    assert_eq!(recovered_sequences(&recovery, 1), [1]);
    assert_eq!(recovery.queues[&1][0].location, stuck);
}

/// Bytes of every file in the log's directory.
fn directory_bytes(fs: &SimulatedFileSystem) -> usize {
    fs.list(Path::new(DIR))
        .expect("lists")
        .iter()
        .map(|name| fs.file_length(&Path::new(DIR).join(name)).expect("listed"))
        .sum()
}

/// Writes 40 segments, each holding one message that stays in queue 1
/// among a dozen that queue 2 settles; returns the ones that stay.
fn one_old_message_per_segment(log: &MessageLog, reports: &Reports) -> Vec<(Location, Vec<u8>)> {
    let mut old = Vec::new();
    let mut ticket = 0;
    for round in 0..40u8 {
        let body = vec![round; 300];
        let (location, _) = log
            .append_routed(&[1], &body, &bytes::Bytes::new())
            .expect("append");
        old.push((location, body));
        for _ in 0..12 {
            let (location, appended) = log
                .append_routed(&[2], &[0; 300], &bytes::Bytes::new())
                .expect("append");
            log.settle(2, location).expect("settle");
            ticket = appended;
        }
    }
    // A last publish is durable only once the settles before it are.
    let (_, last) = log
        .append_routed(&[3], b"last", &bytes::Bytes::new())
        .expect("append");
    reports.wait_durable(last.max(ticket)).expect("durable");
    old
}

/// One old message left in every segment among many settled ones would
/// keep every segment, and the marks settling their neighbours would keep
/// the segments that hold them. Compaction gives that space back: the data
/// directory ends within twice the live data and a few segments, and the
/// old messages read back, and survive a crash, where they were first
/// written.
#[test]
fn one_old_message_per_segment_does_not_stop_disk_being_reclaimed() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    let old = one_old_message_per_segment(&log, &reports);
    let live: usize = old
        .iter()
        .map(|(location, _)| location.length as usize)
        .sum();
    let before = directory_bytes(&fs);
    assert!(
        before > 10 * live,
        "only {before} bytes before compacting {live} live"
    );
    let report = log.compact_now().expect("compacts");
    assert!(report.segments_rewritten >= 30, "{report:?}");
    let after = directory_bytes(&fs);
    assert!(
        after <= 2 * live + 4 * 4096,
        "{after} bytes on disk for {live} bytes of live messages (was {before})"
    );
    for (location, body) in &old {
        assert_eq!(&log.read(*location).expect("reads")[..], &body[..]);
    }
    let locations: Vec<Location> = old.iter().rev().map(|(location, _)| *location).collect();
    for (payload, (_, body)) in log
        .handle()
        .read_many(&locations)
        .into_iter()
        .zip(old.iter().rev())
    {
        assert_eq!(&payload.expect("reads")[..], &body[..]);
    }
    log.abandon();
    fs.crash(|_| 0);
    let (log, recovery, _) = open(&fs);
    let recovered: Vec<Location> = recovery.queues[&1]
        .iter()
        .map(|message| message.location)
        .collect();
    assert_eq!(
        recovered,
        old.iter()
            .map(|(location, _)| *location)
            .collect::<Vec<_>>()
    );
    assert!(
        !recovery.queues.contains_key(&2),
        "settled messages came back"
    );
    for (location, body) in &old {
        assert_eq!(&log.read(*location).expect("reads")[..], &body[..]);
    }
    // Compacting again after the restart finds nothing worth rewriting.
    assert_eq!(log.compact_now().expect("compacts").segments_rewritten, 0);
}

/// A crash during compaction leaves the new file unfinished, or both the
/// new and the old file: recovery keeps the newest complete generation and
/// deletes the rest.
#[test]
fn leftovers_of_an_interrupted_compaction_are_removed() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    let old = one_old_message_per_segment(&log, &reports);
    log.compact_now().expect("compacts");
    log.close().expect("closes");
    let first = old[0].0.segment;
    let stale_generation = Path::new(DIR).join(format!("{first:020}.seg"));
    let unfinished = Path::new(DIR).join(format!("{first:020}.2.compacting"));
    assert!(
        !fs.exists(&stale_generation),
        "the first generation was deleted"
    );
    fs.write(&stale_generation, b"an older generation: never read")
        .expect("writes");
    fs.write(&unfinished, b"half a rewrite").expect("writes");
    let (log, recovery, _) = open(&fs);
    assert!(!fs.exists(&stale_generation) && !fs.exists(&unfinished));
    assert_eq!(
        recovery.corrupt_records_skipped + recovery.torn_records_dropped,
        0
    );
    assert_eq!(recovery.queues[&1].len(), old.len());
    for (location, body) in &old {
        assert_eq!(&log.read(*location).expect("reads")[..], &body[..]);
    }
}

#[test]
fn a_failed_fsync_poisons_the_log() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    fs.fail_next_syncs(1);
    publish(&log, 1, 1, b"doomed");
    assert!(matches!(reports.wait_error(), StoreError::Poisoned(_)));
    let refused = log.append_message(RecordKind::Publish, 1, 2, b"after");
    assert!(
        matches!(refused, Err(StoreError::Poisoned(_))),
        "{refused:?}"
    );
    assert!(log.poisoned().is_some());
}

#[test]
fn a_full_disk_poisons_the_log_and_nothing_durable_is_lost() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    let (_, ticket) = publish(&log, 1, 1, b"kept");
    reports.wait_durable(ticket).unwrap();
    fs.set_capacity(Some(200));
    publish(&log, 1, 2, &[0u8; 500]);
    assert!(matches!(reports.wait_error(), StoreError::Poisoned(_)));
    log.abandon();
    fs.set_capacity(None);
    fs.crash(|unsynced| unsynced);
    let (_, recovery, _) = open(&fs);
    assert_eq!(recovered_sequences(&recovery, 1), [1]);
}

#[derive(Debug, Clone)]
enum Operation {
    Publish {
        queue: u64,
        size: usize,
    },
    Remove {
        pick: usize,
    },
    Deliver {
        pick: usize,
    },
    WaitDurable,
    /// Reads every live message back at once, in an order that `rotate`
    /// turns, through `LogHandle::read_many`.
    ReadMany {
        rotate: usize,
    },
    Crash {
        torn_fraction: u8,
    },
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        6 => (0u64..3, 0usize..1500).prop_map(|(queue, size)| Operation::Publish { queue, size }),
        3 => any::<usize>().prop_map(|pick| Operation::Remove { pick }),
        1 => any::<usize>().prop_map(|pick| Operation::Deliver { pick }),
        1 => Just(Operation::WaitDurable),
        1 => any::<usize>().prop_map(|rotate| Operation::ReadMany { rotate }),
        1 => any::<u8>().prop_map(|torn_fraction| Operation::Crash { torn_fraction }),
    ]
}

/// The model's view of one message.
#[derive(Debug, Clone)]
struct Modelled {
    payload: Vec<u8>,
    location: Location,
    publish_ticket: Ticket,
    removed_at: Option<Ticket>,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Over random publishes, removes and crashes that tear unsynced writes:
    /// every message whose publish was durable and whose removal was not
    /// requested comes back with its payload; no message whose removal was
    /// durable comes back; nothing that was never published appears.
    #[test]
    fn the_log_matches_a_model_across_crashes(operations in proptest::collection::vec(operation(), 1..80)) {
        let fs = SimulatedFileSystem::new();
        let (mut log, _, mut reports) = open(&fs);
        let mut model: BTreeMap<(u64, u64), Modelled> = BTreeMap::new();
        let mut next_sequence = 0u64;
        let mut last_ticket = 0;
        for operation in operations {
            let live: Vec<(u64, u64)> = model.iter()
                .filter(|(_, message)| message.removed_at.is_none())
                .map(|(key, _)| *key)
                .collect();
            match operation {
                Operation::Publish { queue, size } => {
                    next_sequence += 1;
                    let payload: Vec<u8> = (0..size).map(|index| (index as u64 + next_sequence) as u8).collect();
                    let (location, ticket) = publish(&log, queue, next_sequence, &payload);
                    last_ticket = ticket;
                    model.insert((queue, next_sequence), Modelled { payload, location, publish_ticket: ticket, removed_at: None });
                }
                Operation::Remove { pick } if !live.is_empty() => {
                    let key = live[pick % live.len()];
                    let message = model.get_mut(&key).expect("live");
                    let ticket = log.append_remove(key.0, key.1, message.location).expect("remove");
                    message.removed_at = Some(ticket);
                    last_ticket = ticket;
                }
                Operation::Deliver { pick } if !live.is_empty() => {
                    let key = live[pick % live.len()];
                    last_ticket = log.append_delivered(key.0, key.1, model[&key].location).expect("delivered");
                }
                Operation::WaitDurable => reports.wait_durable(last_ticket).expect("durable"),
                Operation::ReadMany { rotate } if !live.is_empty() => {
                    // Some of them may still wait to be written, some lie
                    // in neighbouring records, some in other segments.
                    let mut keys = live.clone();
                    keys.rotate_left(rotate % live.len());
                    let locations: Vec<Location> = keys.iter().map(|key| model[key].location).collect();
                    let payloads = log.handle().read_many(&locations);
                    prop_assert_eq!(payloads.len(), keys.len());
                    for (key, payload) in keys.iter().zip(payloads) {
                        prop_assert_eq!(&payload.expect("read")[..], &model[key].payload[..]);
                    }
                }
                Operation::Crash { torn_fraction } => {
                    let durable = log.durable_ticket();
                    log.abandon();
                    fs.crash(|unsynced| unsynced * torn_fraction as usize / 255);
                    let (reopened, recovery, new_reports) = open(&fs);
                    log = reopened;
                    reports = new_reports;
                    let mut recovered: BTreeMap<(u64, u64), Location> = BTreeMap::new();
                    for (queue, messages) in &recovery.queues {
                        let sequences: VecDeque<u64> = messages.iter().map(|message| message.sequence).collect();
                        prop_assert!(sequences.iter().zip(sequences.iter().skip(1)).all(|(a, b)| a < b), "recovered out of order");
                        for message in messages {
                            recovered.insert((*queue, message.sequence), message.location);
                        }
                    }
                    for (key, message) in &model {
                        let must_exist = message.publish_ticket <= durable && message.removed_at.is_none();
                        let must_not_exist = message.removed_at.is_some_and(|ticket| ticket <= durable);
                        match recovered.get(key) {
                            Some(location) => {
                                prop_assert!(!must_not_exist, "{key:?} was removed durably but came back");
                                prop_assert_eq!(&log.read(*location).expect("read")[..], &message.payload[..]);
                            }
                            None => prop_assert!(!must_exist, "{key:?} was durable but is lost"),
                        }
                    }
                    for key in recovered.keys() {
                        prop_assert!(model.contains_key(key), "{key:?} was never published");
                    }
                    // The model continues from what actually survived.
                    model.retain(|key, _| recovered.contains_key(key));
                    for (key, location) in recovered {
                        let message = model.get_mut(&key).expect("retained");
                        message.location = location;
                        message.removed_at = None;
                        message.publish_ticket = 0;
                    }
                    last_ticket = 0;
                }
                _ => {}
            }
        }
        log.abandon();
    }
}

/// A read that fails says why in `io::ErrorKind` terms, from another
/// thread's handle as from the log: a missing segment is `NotFound`, a
/// record that no longer decodes is `InvalidData`.
#[test]
fn failed_reads_keep_their_error_kind() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    let (first, _) = publish(&log, 1, 1, b"one");
    let (second, ticket) = publish(&log, 1, 2, b"two");
    reports.wait_durable(ticket).unwrap();
    let handle = log.handle();
    assert_eq!(&handle.read(first).unwrap()[..], b"one");

    fs.corrupt(&segment_path(second.segment), second.offset as usize + 20);
    let kind_of = |error: StoreError| match error {
        StoreError::Read { kind, .. } => kind,
        other => panic!("expected a read error, got {other:?}"),
    };
    assert_eq!(
        kind_of(handle.read(second).unwrap_err()),
        std::io::ErrorKind::InvalidData
    );
    let elsewhere = Location {
        segment: second.segment + 100,
        ..second
    };
    assert_eq!(
        kind_of(log.read(elsewhere).unwrap_err()),
        std::io::ErrorKind::NotFound
    );
}

/// Reading several records at once gives each its own payload and its own
/// error: records side by side, records in other segments, a corrupt record
/// among good ones and a segment that does not exist.
#[test]
fn read_many_reads_each_record_and_keeps_each_error() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    let mut written = Vec::new();
    let mut ticket = 0;
    // 4 KiB segments: 40 messages of 300 bytes fill several.
    for sequence in 0..40u64 {
        let payload = vec![sequence as u8; 300];
        let (location, last) = publish(&log, 1, sequence, &payload);
        ticket = last;
        written.push((location, payload));
    }
    reports.wait_durable(ticket).unwrap();
    assert!(
        written.first().unwrap().0.segment != written.last().unwrap().0.segment,
        "the messages span segments"
    );
    let corrupt = written[5].0;
    fs.corrupt(&segment_path(corrupt.segment), corrupt.offset as usize + 20);
    let missing = Location {
        segment: written.last().unwrap().0.segment + 100,
        ..written[0].0
    };
    // Out of order, so that the reads are sorted and each answer still
    // lands where it was asked.
    let mut locations: Vec<Location> = written
        .iter()
        .rev()
        .map(|(location, _)| *location)
        .collect();
    locations.insert(10, missing);
    let payloads = log.handle().read_many(&locations);
    assert_eq!(payloads.len(), locations.len());
    for (location, payload) in locations.iter().zip(payloads) {
        let kind = |error: StoreError| match error {
            StoreError::Read { kind, .. } => kind,
            other => panic!("expected a read error, got {other:?}"),
        };
        if *location == missing {
            assert_eq!(kind(payload.unwrap_err()), std::io::ErrorKind::NotFound);
        } else if *location == corrupt {
            assert_eq!(kind(payload.unwrap_err()), std::io::ErrorKind::InvalidData);
        } else {
            let (_, expected) = written
                .iter()
                .find(|(written_at, _)| written_at == location)
                .expect("written");
            assert_eq!(&payload.unwrap()[..], &expected[..]);
        }
    }
}

#[derive(Debug, Clone)]
enum RoutedOperation {
    /// A message for the queues whose bits are set in `queues` (1 to 7).
    Publish {
        queues: u8,
        size: usize,
    },
    Settle {
        pick: usize,
    },
    Return {
        pick: usize,
    },
    WaitDurable,
    ReadMany {
        rotate: usize,
    },
    Compact,
    Crash {
        torn_fraction: u8,
    },
    CleanRestart,
}

fn routed_operation() -> impl Strategy<Value = RoutedOperation> {
    prop_oneof![
        6 => (1u8..8, 0usize..1500)
            .prop_map(|(queues, size)| RoutedOperation::Publish { queues, size }),
        4 => any::<usize>().prop_map(|pick| RoutedOperation::Settle { pick }),
        1 => any::<usize>().prop_map(|pick| RoutedOperation::Return { pick }),
        1 => Just(RoutedOperation::WaitDurable),
        1 => any::<usize>().prop_map(|rotate| RoutedOperation::ReadMany { rotate }),
        2 => Just(RoutedOperation::Compact),
        1 => any::<u8>().prop_map(|torn_fraction| RoutedOperation::Crash { torn_fraction }),
        1 => Just(RoutedOperation::CleanRestart),
    ]
}

/// The model's view of one queue's share of a message written once.
#[derive(Debug, Clone)]
struct RoutedShare {
    payload: Vec<u8>,
    location: Location,
    publish_ticket: Ticket,
    /// Settled: None while the settle may not be written yet, then the
    /// ticket of a publish made after it, durable only after the settle.
    settled: Option<Option<Ticket>>,
    returned: bool,
}

/// A message's identity across a restart: its queue and where its record
/// starts.
type ShareKey = (u64, u64, u32);

fn share_key(queue: u64, location: Location) -> ShareKey {
    (queue, location.segment, location.offset)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Messages written once for several queues, settled queue by queue,
    /// across crashes and clean restarts: a durable message comes back in
    /// every queue that had not settled it; a settle made durable keeps it
    /// away from that queue only; after a clean restart exactly the
    /// messages marked returned come back delivered. Compaction, run at
    /// any point, changes none of this, and every live message still
    /// reads back from where it was first written.
    #[test]
    fn messages_written_once_match_a_model_across_crashes(
        operations in proptest::collection::vec(routed_operation(), 1..80)
    ) {
        let fs = SimulatedFileSystem::new();
        let (mut log, _, mut reports) = open(&fs);
        let mut model: BTreeMap<ShareKey, RoutedShare> = BTreeMap::new();
        let mut last_ticket = 0;
        let mut published = 0u64;
        for operation in operations {
            let live: Vec<ShareKey> = model.iter()
                .filter(|(_, share)| share.settled.is_none() || share.settled == Some(None))
                .filter(|(_, share)| share.settled.is_none())
                .map(|(key, _)| *key)
                .collect();
            match operation {
                RoutedOperation::Publish { queues, size } => {
                    published += 1;
                    let payload: Vec<u8> = (0..size).map(|index| (index as u64 + published) as u8).collect();
                    let ids: Vec<u64> = (0..3).filter(|bit| queues & (1 << bit) != 0).map(|bit| bit + 1).collect();
                    let (location, ticket) = log
                        .append_routed(&ids, &payload[..size / 2], &bytes::Bytes::copy_from_slice(&payload[size / 2..]))
                        .expect("append");
                    last_ticket = ticket;
                    // Every settle made before this publish is written by
                    // the time it is durable.
                    for share in model.values_mut() {
                        if share.settled == Some(None) {
                            share.settled = Some(Some(ticket));
                        }
                    }
                    for queue in ids {
                        model.insert(share_key(queue, location), RoutedShare {
                            payload: payload.clone(),
                            location,
                            publish_ticket: ticket,
                            settled: None,
                            returned: false,
                        });
                    }
                }
                RoutedOperation::Settle { pick } if !live.is_empty() => {
                    let key = live[pick % live.len()];
                    let share = model.get_mut(&key).expect("live");
                    log.settle(key.0, share.location).expect("settle");
                    share.settled = Some(None);
                }
                RoutedOperation::Return { pick } if !live.is_empty() => {
                    let key = live[pick % live.len()];
                    let share = model.get_mut(&key).expect("live");
                    log.mark_returned(key.0, share.location).expect("returned");
                    share.returned = true;
                }
                RoutedOperation::WaitDurable => reports.wait_durable(last_ticket).expect("durable"),
                RoutedOperation::Compact => {
                    log.compact_now().expect("compacts");
                }
                RoutedOperation::ReadMany { rotate } if !live.is_empty() => {
                    let mut keys = live.clone();
                    keys.rotate_left(rotate % live.len());
                    let locations: Vec<Location> = keys.iter().map(|key| model[key].location).collect();
                    let payloads = log.handle().read_many(&locations);
                    for (key, payload) in keys.iter().zip(payloads) {
                        prop_assert_eq!(&payload.expect("read")[..], &model[key].payload[..]);
                    }
                }
                RoutedOperation::Crash { .. } | RoutedOperation::CleanRestart => {
                    let clean = matches!(operation, RoutedOperation::CleanRestart);
                    let durable = if clean {
                        log.close().expect("closes");
                        u64::MAX
                    } else {
                        let durable = log.durable_ticket();
                        log.abandon();
                        let RoutedOperation::Crash { torn_fraction } = operation else { unreachable!() };
                        fs.crash(|unsynced| unsynced * torn_fraction as usize / 255);
                        durable
                    };
                    let (reopened, recovery, new_reports) = open(&fs);
                    log = reopened;
                    reports = new_reports;
                    prop_assert_eq!(recovery.clean_shutdown, clean);
                    let mut recovered: BTreeMap<ShareKey, (Location, bool)> = BTreeMap::new();
                    for (queue, messages) in &recovery.queues {
                        prop_assert!(
                            messages.windows(2).all(|pair| pair[0].sequence < pair[1].sequence
                                && (pair[0].location.segment, pair[0].location.offset)
                                    < (pair[1].location.segment, pair[1].location.offset)),
                            "queue {} recovered out of order", queue
                        );
                        for message in messages {
                            recovered.insert(share_key(*queue, message.location), (message.location, message.delivered));
                        }
                    }
                    for (key, share) in &model {
                        let settle_durable = match share.settled {
                            Some(Some(ticket)) => ticket <= durable,
                            Some(None) => clean,
                            None => false,
                        };
                        let must_exist = share.publish_ticket <= durable && share.settled.is_none();
                        match recovered.get(key) {
                            Some((location, delivered)) => {
                                prop_assert!(!settle_durable, "{:?} was settled durably but came back", key);
                                prop_assert_eq!(&log.read(*location).expect("read")[..], &share.payload[..]);
                                if clean {
                                    prop_assert_eq!(*delivered, share.returned, "{:?} delivered flag", key);
                                } else {
                                    prop_assert!(*delivered, "after a crash every message is marked delivered");
                                }
                            }
                            None => prop_assert!(!must_exist, "{:?} was durable but is lost", key),
                        }
                    }
                    for key in recovered.keys() {
                        prop_assert!(model.contains_key(key), "{:?} was never published", key);
                    }
                    model.retain(|key, _| recovered.contains_key(key));
                    for (key, share) in model.iter_mut() {
                        share.settled = None;
                        share.publish_ticket = 0;
                        share.returned = recovered[key].1;
                    }
                    last_ticket = 0;
                }
                _ => {}
            }
        }
        log.abandon();
    }
}

/// Paged records only free memory and recovery ignores them: a batch of
/// nothing else is written without an fsync, so a transient backlog paged
/// out costs no fsyncs. A failing fsync shows it: paging goes on
/// untouched, and the first record that needs the disk poisons the log.
#[test]
fn paged_records_alone_are_written_without_an_fsync() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    fs.fail_next_syncs(1_000);
    let mut last = 0;
    let mut locations = Vec::new();
    for sequence in 1..=50u64 {
        let (location, ticket) = log
            .append_message(RecordKind::Paged, 9, sequence, &sequence.to_le_bytes())
            .expect("paged");
        locations.push(location);
        last = ticket;
    }
    reports
        .wait_durable(last)
        .expect("written, and no fsync failed");
    assert!(log.poisoned().is_none());
    for (sequence, location) in (1..=50u64).zip(&locations) {
        assert_eq!(&log.read(*location).unwrap()[..], &sequence.to_le_bytes());
    }
    assert!(fs.file_length(&segment_path(locations[0].segment)).unwrap() > 0);
    let (_, ticket) = publish(&log, 1, 1, b"durable");
    assert!(matches!(
        reports.wait_durable(ticket),
        Err(StoreError::Poisoned(_))
    ));
    log.abandon();
}

/// A segment begun by a batch written without an fsync holds a message
/// durably once one lands in it: the batch that brings the message fsyncs
/// the file (and the directory, which the simulated disk does not model).
#[test]
fn a_segment_begun_by_paged_records_is_durable_once_a_message_lands_in_it() {
    let fs = SimulatedFileSystem::new();
    let (log, _, reports) = open(&fs);
    let (_, paged) = log
        .append_message(RecordKind::Paged, 9, 1, b"transient")
        .expect("paged");
    reports.wait_durable(paged).unwrap();
    let (location, ticket) = publish(&log, 1, 1, b"persistent");
    reports.wait_durable(ticket).unwrap();
    log.abandon();
    fs.crash(|_| 0);
    let (reopened, recovery, _) = open(&fs);
    assert_eq!(recovered_sequences(&recovery, 1), [1]);
    assert_eq!(&reopened.read(location).unwrap()[..], b"persistent");
    reopened.abandon();
}
