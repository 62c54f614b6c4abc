//! The spilling backlog on a simulated disk, against a model: whatever is
//! pushed, taken and put back, and however often the disk runs out of
//! space, messages come out in the order a queue owes them, the memory
//! held stays within the head window while the disk accepts writes, and no
//! spill file outlives what it held.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use warren_store::spill::{CHUNK_ENTRIES, HEAD_WINDOW, SPILL_BATCH};
use warren_store::{
    Backlog, FileSystem, Sequence, SimulatedFileSystem, SpillArea, SpillEntry, SpillingBacklog,
};

const DIR: &str = "/data/messages/spill";

/// A test message: a value, and whether its body is stored elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    value: u64,
    stored: bool,
}

impl SpillEntry for Entry {
    const ENCODED_BYTES: usize = 16;

    fn can_spill(&self) -> bool {
        self.stored
    }

    fn encode(&self, sequence: Sequence, out: &mut Vec<u8>) {
        out.extend_from_slice(&sequence.to_le_bytes());
        out.extend_from_slice(&self.value.to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Option<(Sequence, Self)> {
        let sequence = u64::from_le_bytes(bytes[..8].try_into().ok()?);
        let value = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
        Some((
            sequence,
            Entry {
                value,
                stored: true,
            },
        ))
    }
}

fn spill_files(fs: &SimulatedFileSystem) -> Vec<String> {
    fs.list(Path::new(DIR)).expect("lists")
}

#[derive(Debug, Clone)]
enum Op {
    /// Pushes this many messages; every `unstored_every`-th one has its
    /// body only in memory (0: none).
    Push {
        count: usize,
        unstored_every: usize,
    },
    Take(usize),
    /// Puts back up to this many of the messages taken last.
    PutBack(usize),
    /// The disk is full (writes fail) or has room again.
    DiskFull(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..12_000, prop_oneof![5 => Just(0usize), 1 => 1usize..5_000])
            .prop_map(|(count, unstored_every)| Op::Push { count, unstored_every }),
        4 => (1usize..12_000).prop_map(Op::Take),
        2 => (0usize..300).prop_map(Op::PutBack),
        1 => any::<bool>().prop_map(Op::DiskFull),
    ]
}

fn run(ops: Vec<Op>) {
    let fs = SimulatedFileSystem::new();
    let area = SpillArea::open(fs.clone(), Path::new(DIR)).expect("opens");
    let mut backlog = SpillingBacklog::<Entry>::new(Some(Arc::clone(&area)));
    let mut model: BTreeMap<Sequence, u64> = BTreeMap::new();
    let mut next_sequence = 0;
    let mut taken: Vec<(Sequence, Entry)> = Vec::new();
    // Messages put back and not taken again.
    let mut returned: std::collections::BTreeSet<Sequence> = Default::default();
    let mut disk_ever_full = false;
    let mut unstored_ever = false;
    for op in ops {
        match op {
            Op::Push {
                count,
                unstored_every,
            } => {
                for index in 0..count {
                    next_sequence += 1;
                    let stored = unstored_every == 0 || index % unstored_every != 0;
                    unstored_ever |= !stored;
                    let entry = Entry {
                        value: next_sequence * 3,
                        stored,
                    };
                    if !backlog.holds_in_memory(&entry) {
                        // A queue stores the body first; here an entry
                        // marked unstored plays a failed store.
                    }
                    backlog.push_back(next_sequence, entry);
                    model.insert(next_sequence, next_sequence * 3);
                }
            }
            Op::Take(count) => {
                for _ in 0..count {
                    let expected = model.pop_first();
                    let got = backlog.pop_front();
                    assert_eq!(
                        got.as_ref()
                            .map(|(sequence, entry)| (*sequence, entry.value)),
                        expected
                    );
                    match got {
                        Some(got) => {
                            returned.remove(&got.0);
                            taken.push(got);
                        }
                        None => break,
                    }
                }
            }
            Op::PutBack(count) => {
                for _ in 0..count.min(taken.len()) {
                    let (sequence, entry) = taken.pop().expect("counted");
                    model.insert(sequence, entry.value);
                    returned.insert(sequence);
                    backlog.requeue(sequence, entry);
                }
            }
            Op::DiskFull(full) => {
                disk_ever_full |= full;
                fs.set_capacity(full.then_some(0));
            }
        }
        assert_eq!(backlog.len(), model.len());
        assert_eq!(
            backlog
                .front()
                .map(|(sequence, entry)| (sequence, entry.value)),
            model
                .first_key_value()
                .map(|(sequence, value)| (*sequence, *value))
        );
        if !disk_ever_full && !unstored_ever {
            // In memory: the head window, what came back, and one batch
            // on its way to disk.
            let in_memory = backlog.len() - backlog.spilled_len();
            assert!(
                in_memory <= HEAD_WINDOW + SPILL_BATCH + returned.len(),
                "{in_memory} entries in memory"
            );
        }
        assert_eq!(area.entries_on_disk(), backlog.spilled_len() as u64);
    }
    fs.set_capacity(None);
    while let Some((sequence, entry)) = backlog.pop_front() {
        assert_eq!(Some((sequence, entry.value)), model.pop_first());
    }
    assert!(model.is_empty());
    assert_eq!(
        spill_files(&fs),
        Vec::<String>::new(),
        "an emptied backlog keeps no file"
    );
    backlog.push_back(
        next_sequence + 1,
        Entry {
            value: 0,
            stored: true,
        },
    );
    drop(backlog);
    assert_eq!(area.entries_on_disk(), 0);
    assert!(spill_files(&fs).is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn a_spilling_backlog_behaves_like_the_model(ops in prop::collection::vec(op(), 1..40)) {
        run(ops);
    }
}

#[test]
fn a_long_backlog_spills_across_files_and_keeps_its_head_only() {
    let fs = SimulatedFileSystem::new();
    let area = SpillArea::open(fs.clone(), Path::new(DIR)).expect("opens");
    let mut backlog = SpillingBacklog::<Entry>::new(Some(area));
    let total = 3 * CHUNK_ENTRIES as u64 + 17;
    for sequence in 1..=total {
        backlog.push_back(
            sequence,
            Entry {
                value: sequence,
                stored: true,
            },
        );
    }
    assert_eq!(backlog.len() as u64, total);
    assert!(backlog.len() - backlog.spilled_len() <= HEAD_WINDOW + SPILL_BATCH);
    let files = backlog.spilled_len().div_ceil(CHUNK_ENTRIES as usize);
    assert_eq!(files, 3);
    assert_eq!(spill_files(&fs).len(), files);
    let mut files_seen = files;
    for sequence in 1..=total {
        let (got, entry) = backlog.pop_front().expect("still there");
        assert_eq!((got, entry.value), (sequence, sequence));
        let files = spill_files(&fs).len();
        assert!(
            files <= files_seen,
            "spill files only go once reading starts"
        );
        files_seen = files;
    }
    assert!(spill_files(&fs).is_empty());
}

#[test]
fn files_left_by_an_earlier_run_are_deleted() {
    let fs = SimulatedFileSystem::new();
    fs.append(
        &Path::new(DIR).join("00000000000000aa-0000000001.spill"),
        b"old",
    )
    .unwrap();
    fs.append(&Path::new(DIR).join("keep.txt"), b"not ours")
        .unwrap();
    let _area = SpillArea::open(fs.clone(), Path::new(DIR)).expect("opens");
    assert_eq!(spill_files(&fs), vec!["keep.txt".to_owned()]);
}

#[test]
fn without_an_area_everything_stays_in_memory() {
    let mut backlog = SpillingBacklog::<Entry>::new(None);
    for sequence in 1..=(HEAD_WINDOW as u64 * 3) {
        let entry = Entry {
            value: sequence,
            stored: true,
        };
        assert!(backlog.holds_in_memory(&entry));
        backlog.push_back(sequence, entry);
    }
    assert_eq!(backlog.spilled_len(), 0);
    assert_eq!(backlog.pop_front().map(|(sequence, _)| sequence), Some(1));
}
