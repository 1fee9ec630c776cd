use std::path::PathBuf;

use super::*;
use crate::frame::{Command, Exec};

/// A directory removed on drop; std only, so the lib keeps no dev-dependency.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "outpost-store-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn db(&self) -> PathBuf {
        self.0.join("store.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn lane() -> Lane {
    frame::default_lane()
}

fn exec(to: &str, word: &str) -> Outgoing {
    Outgoing {
        to: n(to),
        lane: lane(),
        ttl_s: None,
        body: Body::Command(Command::Exec(Exec {
            argv: vec!["echo".into(), word.into()],
            ..Exec::default()
        })),
    }
}

fn open(dir: &TempDir, me: &str, quota: u64) -> Store {
    let cfg = StoreConfig {
        durability: Durability::Normal,
        quota_bytes: quota,
    };
    Store::open(&dir.db(), &n(me), &cfg).unwrap().0
}

fn argv_word(env: &Envelope) -> String {
    match &env.body {
        Body::Command(Command::Exec(e)) => e.argv[1].clone(),
        other => panic!("not an exec: {other:?}"),
    }
}

#[test]
fn enqueue_numbers_frames_per_stream_in_one_transaction() {
    let dir = TempDir::new("seq");
    let mut s = open(&dir, "central", u64::MAX);
    let q = s
        .enqueue(vec![exec("a", "1"), exec("b", "1"), exec("a", "2")], 1)
        .unwrap();
    assert_eq!(
        q.iter().map(|q| (q.to.as_str(), q.seq)).collect::<Vec<_>>(),
        [("a", 1), ("b", 1), ("a", 2)]
    );
    let (frames, bad) = s.outbox_frames(&n("a"), &lane(), 1, 10, 2).unwrap();
    assert!(bad.is_empty());
    assert_eq!(frames.iter().map(|f| f.0).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(s.apply_ack(&n("a"), &lane(), 1).unwrap(), 1);
    // A forged ack past the end frees only what exists.
    assert_eq!(s.apply_ack(&n("a"), &lane(), 99).unwrap(), 1);
    assert_eq!(s.counts().unwrap().outbox, 1);
    let q = s.enqueue(vec![exec("a", "3")], 3).unwrap();
    assert_eq!(q[0].seq, 3, "numbers continue after acks");
}

#[test]
fn receive_drops_duplicates_holds_gaps_and_advances_the_watermark() {
    let dir = TempDir::new("recv");
    let mut sender = open(&dir, "central", u64::MAX);
    sender
        .enqueue((1..=4).map(|i| exec("a", &i.to_string())).collect(), 1)
        .unwrap();
    let (frames, _) = sender.outbox_frames(&n("a"), &lane(), 1, 4, 1).unwrap();
    let dir_a = TempDir::new("recv-a");
    let mut a = open(&dir_a, "a", u64::MAX);
    let recv = |a: &mut Store, i: usize| {
        let bytes = &frames[i].1;
        a.receive(&[(frame::decode(bytes).unwrap(), bytes.as_slice())], 0)
            .unwrap()[0]
    };
    assert_eq!(recv(&mut a, 0), Receipt::Accepted { watermark: 1 });
    assert_eq!(recv(&mut a, 0), Receipt::Duplicate { watermark: 1 });
    assert_eq!(recv(&mut a, 2), Receipt::Held { watermark: 1 });
    assert_eq!(recv(&mut a, 3), Receipt::Held { watermark: 1 });
    assert_eq!(recv(&mut a, 2), Receipt::Duplicate { watermark: 1 });
    // Filling the gap releases everything held behind it.
    assert_eq!(recv(&mut a, 1), Receipt::Accepted { watermark: 4 });
    let (ready, _) = a.runnable(4, 2).unwrap();
    assert_eq!(
        ready.len(),
        1,
        "an ordered stream offers one command at a time"
    );
    assert_eq!(argv_word(&ready[0].env), "1");
}

#[test]
fn journal_runs_each_command_once_and_queues_its_result_atomically() {
    let dir = TempDir::new("journal");
    let mut sender = open(&dir, "central", u64::MAX);
    sender
        .enqueue(vec![exec("a", "1"), exec("a", "2")], 1)
        .unwrap();
    let (frames, _) = sender.outbox_frames(&n("a"), &lane(), 1, 2, 1).unwrap();
    let dir_a = TempDir::new("journal-a");
    let mut a = open(&dir_a, "a", u64::MAX);
    let batch: Vec<_> = frames
        .iter()
        .map(|(_, b)| (frame::decode(b).unwrap(), b.as_slice()))
        .collect();
    a.receive(&batch, 0).unwrap();

    let (ready, _) = a.runnable(4, 2).unwrap();
    a.start(&ready[0], "exec", 2).unwrap();
    assert!(
        a.runnable(4, 3).unwrap().0.is_empty(),
        "nothing else runs while the first is running"
    );
    assert!(
        a.start(&ready[0], "exec", 3).is_err(),
        "a second start of the same command is refused"
    );
    let q = a
        .finish(
            &ready[0],
            "exec",
            CmdResult::without_run(1, Status::Ok, "", 4),
            4,
        )
        .unwrap();
    assert_eq!((q.to.as_str(), q.seq), ("central", 1));
    let (ready, _) = a.runnable(4, 5).unwrap();
    assert_eq!(argv_word(&ready[0].env), "2");

    // Restart with the second command running: it is reported interrupted, not re-run.
    a.start(&ready[0], "exec", 5).unwrap();
    drop(a);
    let mut a = open(&dir_a, "a", u64::MAX);
    let queued = a.recover_interrupted(6).unwrap();
    assert_eq!(queued.len(), 1);
    assert!(a.runnable(4, 7).unwrap().0.is_empty());
    let (results, _) = a.outbox_frames(&n("central"), &lane(), 1, 2, 7).unwrap();
    let statuses: Vec<_> = results
        .iter()
        .map(|(_, b)| match frame::decode(b).unwrap().body {
            Body::Result(r) => (r.seq, r.status),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(statuses, [(1, Status::Ok), (2, Status::Interrupted)]);
    assert_eq!(
        a.counts().unwrap(),
        Counts {
            outbox: 2,
            ..Counts::default()
        }
    );
}

/// Flips a byte of the first occurrence of `needle` in the database file.
fn corrupt_on_disk(db: &std::path::Path, needle: &[u8]) {
    let mut bytes = std::fs::read(db).unwrap();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in the database file");
    bytes[at] ^= 0x20;
    std::fs::write(db, bytes).unwrap();
}

fn checkpoint(s: &Store) {
    s.raw()
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
}

#[test]
fn corrupt_outbox_frame_on_disk_is_quarantined_and_later_frames_still_flow() {
    let dir = TempDir::new("corrupt-out");
    let mut s = open(&dir, "central", u64::MAX);
    s.enqueue(
        vec![
            exec("a", "first"),
            exec("a", "marker-two"),
            exec("a", "third"),
        ],
        1,
    )
    .unwrap();
    checkpoint(&s);
    drop(s);
    corrupt_on_disk(&dir.db(), b"marker-two");

    let mut s = open(&dir, "central", u64::MAX);
    let (frames, bad) = s.outbox_frames(&n("a"), &lane(), 1, 3, 2).unwrap();
    assert_eq!(bad.len(), 1);
    assert_eq!((bad[0].seq, &bad[0].error), (2, &FrameError::BadCrc));
    let bodies: Vec<_> = frames
        .iter()
        .map(|(seq, b)| (*seq, frame::decode(b).unwrap().body))
        .collect();
    assert_eq!(
        bodies.len(),
        3,
        "the stream keeps its numbers: the hole is filled"
    );
    assert!(matches!(&bodies[1], (2, Body::Lost { .. })));
    assert!(matches!(&bodies[2], (3, Body::Command(_))));
    assert_eq!(s.counts().unwrap().quarantined, 1);
    s.integrity_check().unwrap();
}

#[test]
fn corrupt_inbox_frame_on_disk_is_quarantined_its_sender_told_and_the_next_runs() {
    let dir = TempDir::new("corrupt-in-sender");
    let mut sender = open(&dir, "central", u64::MAX);
    sender
        .enqueue(vec![exec("a", "marker-one"), exec("a", "two")], 1)
        .unwrap();
    let (frames, _) = sender.outbox_frames(&n("a"), &lane(), 1, 2, 1).unwrap();
    let dir_a = TempDir::new("corrupt-in");
    let mut a = open(&dir_a, "a", u64::MAX);
    let batch: Vec<_> = frames
        .iter()
        .map(|(_, b)| (frame::decode(b).unwrap(), b.as_slice()))
        .collect();
    a.receive(&batch, 0).unwrap();
    checkpoint(&a);
    drop(a);
    corrupt_on_disk(&dir_a.db(), b"marker-one");

    let mut a = open(&dir_a, "a", u64::MAX);
    let (ready, bad) = a.runnable(4, 2).unwrap();
    assert_eq!(bad.len(), 1);
    assert!(
        ready.is_empty(),
        "the ordered stream does not run past the hole in the same pass"
    );
    let (ready, bad) = a.runnable(4, 3).unwrap();
    assert!(bad.is_empty());
    assert_eq!(argv_word(&ready[0].env), "two");
    // The sender hears which of its frames was discarded.
    let (notice, _) = a.outbox_frames(&n("central"), &lane(), 1, 1, 3).unwrap();
    assert!(matches!(
        frame::decode(&notice[0].1).unwrap().body,
        Body::Discarded { seq: 1, .. }
    ));
    a.integrity_check().unwrap();
}

#[test]
fn quota_refuses_whole_batches_and_recovers_after_acks() {
    let dir = TempDir::new("quota");
    let mut s = open(&dir, "central", 2_000);
    let mut n_ok = 0;
    let err = loop {
        match s.enqueue(
            vec![exec("a", &"x".repeat(100)), exec("a", &"y".repeat(100))],
            1,
        ) {
            Ok(_) => n_ok += 2,
            Err(e) => break e,
        }
    };
    assert!(n_ok > 0);
    match err {
        StoreError::Full {
            used,
            quota,
            rejected,
            ..
        } => {
            assert_eq!(quota, 2_000);
            assert!(used <= quota);
            assert_eq!(rejected.len(), 2, "the refused items come back");
        }
        other => panic!("expected Full, got {other}"),
    }
    assert_eq!(s.counts().unwrap().outbox, n_ok, "nothing half-written");
    // Reopening recomputes the same usage from the database.
    let used = s.usage().0;
    drop(s);
    let mut s = open(&dir, "central", 2_000);
    assert_eq!(s.usage().0, used);
    s.apply_ack(&n("a"), &lane(), n_ok).unwrap();
    assert_eq!(s.usage().0, 0);
    s.enqueue(vec![exec("a", "again")], 2).unwrap();
    s.integrity_check().unwrap();
}

#[test]
fn quota_defers_received_frames_without_storing_them() {
    let dir = TempDir::new("quota-recv-sender");
    let mut sender = open(&dir, "central", u64::MAX);
    sender
        .enqueue(
            (0..10).map(|i| exec("a", &format!("{i:0>200}"))).collect(),
            1,
        )
        .unwrap();
    let (frames, _) = sender.outbox_frames(&n("a"), &lane(), 1, 10, 1).unwrap();
    let dir_a = TempDir::new("quota-recv");
    let mut a = open(&dir_a, "a", 1_000);
    let batch: Vec<_> = frames
        .iter()
        .map(|(_, b)| (frame::decode(b).unwrap(), b.as_slice()))
        .collect();
    let receipts = a.receive(&batch, 0).unwrap();
    let stored = receipts
        .iter()
        .filter(|r| matches!(r, Receipt::Accepted { .. }))
        .count();
    assert!(stored > 0 && stored < 10);
    assert!(matches!(receipts[stored], Receipt::NoSpace { .. }));
    assert_eq!(a.watermark(&n("central"), &lane()).unwrap(), stored as u64);
    a.integrity_check().unwrap();
}

#[test]
fn an_asleep_peer_keeps_its_polls_while_online_and_a_plain_offline_forgets_them() {
    let dir = TempDir::new("polls");
    let mut s = open(&dir, "central", u64::MAX);
    let polls = Polls {
        every_ms: 1_800_000,
        next_ms: 5_000_000,
    };
    s.set_asleep(&n("ship1"), polls, 1_000).unwrap();
    assert_eq!(s.peers().unwrap(), vec![(n("ship1"), false, 1_000)]);
    assert_eq!(s.polls().unwrap().get(&n("ship1")), Some(&polls));
    // Back on its poll: online, and still a node that polls.
    s.set_presence(&n("ship1"), true, 2_000).unwrap();
    assert_eq!(s.polls().unwrap().get(&n("ship1")), Some(&polls));
    s.set_asleep(&n("ship1"), polls, 3_000).unwrap();
    assert_eq!(s.peers().unwrap(), vec![(n("ship1"), false, 3_000)]);
    // An always-on link's will: it does not poll (any more).
    s.set_presence(&n("ship1"), false, 4_000).unwrap();
    assert!(s.polls().unwrap().is_empty());
}

#[test]
fn migrations_set_user_version_and_a_newer_database_is_refused() {
    let dir = TempDir::new("migrate");
    let s = open(&dir, "a", u64::MAX);
    let v: i64 = s
        .raw()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v as usize, schema::latest());
    s.raw().pragma_update(None, "user_version", 99i64).unwrap();
    drop(s);
    let cfg = StoreConfig::default();
    assert!(matches!(
        Store::open(&dir.db(), &n("a"), &cfg),
        Err(StoreError::TooNew(99, _))
    ));
}

#[test]
fn a_batch_commits_once_and_a_failing_operation_inside_it_undoes_only_itself() {
    let dir = TempDir::new("batch");
    let mut s = open(&dir, "central", 1000);
    let outside = || {
        let c = Connection::open(dir.db()).unwrap();
        c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };
    s.begin_batch().unwrap();
    s.enqueue(vec![exec("a", "1")], 1).unwrap();
    s.enqueue(vec![exec("a", "2")], 1).unwrap();
    // Over the quota: written inside its own savepoint, then rolled back to it.
    let big = "x".repeat(2000);
    assert!(matches!(
        s.enqueue(vec![exec("a", &big)], 1),
        Err(StoreError::Full { .. })
    ));
    assert_eq!(outside(), 0, "nothing is visible before the batch commits");
    s.end_batch().unwrap();
    assert_eq!(outside(), 2);
    let (frames, _) = s.outbox_frames(&n("a"), &lane(), 1, 10, 2).unwrap();
    assert_eq!(frames.iter().map(|f| f.0).collect::<Vec<_>>(), [1, 2]);
    // Without a batch every operation commits on its own, as before.
    s.end_batch().unwrap();
    let q = s.enqueue(vec![exec("a", "3")], 1).unwrap();
    assert_eq!(
        q[0].seq, 3,
        "the refused enqueue left no sequence number behind"
    );
    assert_eq!(outside(), 3);
}

#[test]
fn facts_queued_are_recorded_with_their_frame_and_reports_build_the_registry() {
    let dir = TempDir::new("facts-ship");
    let mut ship = open(&dir, "ship1", u64::MAX);
    let facts = |pairs: &[(&str, &str)]| -> crate::facts::Snapshot {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let first = facts(&[("arch", "mips"), ("role", "gateway")]);
    let sent = FactsSent {
        peer_epoch: 7,
        my_epoch: ship.epoch(),
        full_ms: 10,
        facts: first.clone(),
    };
    let q1 = ship
        .queue_facts(&n("central"), crate::facts::full(&first), &sent, 10)
        .unwrap();
    assert_eq!(ship.facts_sent(&n("central")).unwrap(), Some(sent.clone()));
    let now = facts(&[("arch", "mips"), ("role", "spare")]);
    let change = crate::facts::delta(&first, &now).unwrap();
    let sent2 = FactsSent {
        facts: now.clone(),
        ..sent
    };
    let q2 = ship.queue_facts(&n("central"), change, &sent2, 20).unwrap();
    assert_eq!((q1.lane.as_str(), q2.seq), ("bulk.facts", q1.seq + 1));

    let dir_c = TempDir::new("facts-central");
    let mut central = open(&dir_c, "central", u64::MAX);
    let (frames, _) = ship
        .outbox_frames(&n("central"), &q1.lane, q1.seq, q2.seq, 20)
        .unwrap();
    let batch: Vec<(Envelope, &[u8])> = frames
        .iter()
        .map(|(_, b)| (frame::decode(b).unwrap(), b.as_slice()))
        .collect();
    central.receive(&batch, 30).unwrap();
    for _ in 0..2 {
        let (ready, _) = central.runnable(8, 30).unwrap();
        let Body::Facts(f) = &ready[0].env.body else {
            panic!("{:?}", ready[0].env.body)
        };
        central.take_facts(&ready[0], f, 30).unwrap();
    }
    central.note_seen(&n("ship1"), 40).unwrap();
    let nodes = central.nodes().unwrap();
    let rec = &nodes[&n("ship1")];
    assert_eq!(rec.facts, now);
    assert_eq!((rec.facts_ms, rec.last_seen_ms), (Some(30), Some(40)));
    assert_eq!(central.counts().unwrap().inbox, 0, "both frames consumed");
}
