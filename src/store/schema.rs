//! Schema migrations, keyed by `PRAGMA user_version`.
//!
//! Append only: migration N turns version N into N+1. Never edit one that has shipped.

use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
    // 0 -> 1: streams, outbox, inbox, journal, results, quarantine, events.
    "
    CREATE TABLE out_streams (
        peer TEXT NOT NULL, lane TEXT NOT NULL,
        last_seq INTEGER NOT NULL,      -- highest sequence number assigned
        acked INTEGER NOT NULL,         -- highest sequence number the peer acknowledged
        PRIMARY KEY (peer, lane)
    );
    -- Frames not yet acknowledged by their receiver.
    CREATE TABLE outbox (
        peer TEXT NOT NULL, lane TEXT NOT NULL, seq INTEGER NOT NULL,
        frame BLOB NOT NULL,
        PRIMARY KEY (peer, lane, seq)
    );
    CREATE TABLE in_streams (
        peer TEXT NOT NULL, lane TEXT NOT NULL,
        watermark INTEGER NOT NULL,     -- every frame up to here is stored or consumed
        PRIMARY KEY (peer, lane)
    );
    -- Frames received and not yet consumed; seq > watermark means held after a gap.
    CREATE TABLE inbox (
        peer TEXT NOT NULL, lane TEXT NOT NULL, seq INTEGER NOT NULL,
        frame BLOB NOT NULL,
        PRIMARY KEY (peer, lane, seq)
    );
    -- One row per command that reached the executor: at most once, by primary key.
    CREATE TABLE journal (
        peer TEXT NOT NULL, lane TEXT NOT NULL, seq INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'done')),
        method TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        finished_ms INTEGER,
        status TEXT,
        PRIMARY KEY (peer, lane, seq)
    );
    -- Results received for commands this node sent, in arrival order.
    CREATE TABLE results (
        id INTEGER PRIMARY KEY,
        peer TEXT NOT NULL, lane TEXT NOT NULL, seq INTEGER NOT NULL,
        at_ms INTEGER NOT NULL,
        frame BLOB NOT NULL,
        UNIQUE (peer, lane, seq)
    );
    -- Frames that failed their CRC (or would not decode), kept for inspection.
    CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        place TEXT NOT NULL,
        peer TEXT, lane TEXT, seq INTEGER,
        reason TEXT NOT NULL,
        frame BLOB NOT NULL
    );
    -- Errors to report: lost frames, discarded frames, rejected payloads.
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        peer TEXT, lane TEXT, seq INTEGER,
        text TEXT NOT NULL
    );
    ",
    // 1 -> 2: jobs submitted from this node and the peers it has seen.
    "
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        created_ms INTEGER NOT NULL,
        method TEXT NOT NULL,
        summary TEXT NOT NULL
    );
    -- One row per target node; (node, lane, seq) is the command frame it became.
    CREATE TABLE job_targets (
        job INTEGER NOT NULL REFERENCES jobs (id),
        node TEXT NOT NULL, lane TEXT NOT NULL, seq INTEGER NOT NULL,
        state TEXT NOT NULL,            -- queued, delivered, or the result's status
        result INTEGER REFERENCES results (id),
        PRIMARY KEY (job, node),
        UNIQUE (node, lane, seq)
    );
    CREATE TABLE peers (
        name TEXT PRIMARY KEY,
        online INTEGER NOT NULL,
        since_ms INTEGER NOT NULL
    );
    ",
    // 2 -> 3: sealing state. Counters below `reserved` may have been used as nonces;
    // `highest`/`bits` is the replay window of what a peer sent.
    "
    CREATE TABLE seal_out (
        peer TEXT PRIMARY KEY,
        reserved INTEGER NOT NULL
    );
    CREATE TABLE seal_in (
        peer TEXT PRIMARY KEY,
        highest INTEGER NOT NULL,
        bits INTEGER NOT NULL
    );
    ",
    // 3 -> 4: file transfers (both directions), chunks received, files held.
    "
    CREATE TABLE transfers (
        id INTEGER PRIMARY KEY,
        direction TEXT NOT NULL CHECK (direction IN ('out', 'in')),
        peer TEXT NOT NULL,
        file_id TEXT NOT NULL,
        path TEXT NOT NULL,             -- out: the source file; in: the partial file
        size INTEGER NOT NULL,
        sha256 BLOB NOT NULL,
        chunk_size INTEGER NOT NULL,
        n_chunks INTEGER NOT NULL,
        next_chunk INTEGER NOT NULL DEFAULT 0,  -- out: next chunk to enqueue; in: chunks received
        state TEXT NOT NULL,            -- offered, sending, receiving, done, skipped, failed, expired
        reason TEXT NOT NULL DEFAULT '',
        started_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        expires_ms INTEGER,
        UNIQUE (direction, peer, file_id)
    );
    CREATE TABLE file_chunks (
        transfer INTEGER NOT NULL REFERENCES transfers (id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        PRIMARY KEY (transfer, idx)
    );
    CREATE TABLE files (
        source TEXT NOT NULL,
        file_id TEXT NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 BLOB NOT NULL,
        received_ms INTEGER NOT NULL,
        expires_ms INTEGER,
        PRIMARY KEY (source, file_id)
    );
    ",
    // 4 -> 5: running commands are found without walking the journal, which keeps
    // every command ever run (status and restart recovery ask for them).
    "
    CREATE INDEX journal_running ON journal (peer, lane, seq) WHERE state = 'running';
    ",
    // 5 -> 6: store epochs and resynchronisation. `meta` holds this store's random
    // epoch (bound into every seal key) and its generation, bumped by every commit
    // and mirrored in the `store.gen` file beside the database, so a store that
    // lost commits is noticed. `peer_sessions` replaces `seal_in`: per peer, its
    // epoch, the replay window for it, and where the handshake stands. Counters of
    // `seal_out` belong to the current epoch and start again with a new one.
    "
    CREATE TABLE meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        epoch INTEGER NOT NULL,
        gen INTEGER NOT NULL,
        -- Why and when this store last found it had lost committed state, and how
        -- many times it has.
        lost_ms INTEGER,
        lost_reason TEXT,
        losses INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE peer_sessions (
        peer TEXT PRIMARY KEY,
        epoch INTEGER NOT NULL,         -- the peer's store epoch, as authenticated
        highest INTEGER NOT NULL,       -- replay window of payloads from that epoch
        bits INTEGER NOT NULL,
        knows_mine INTEGER NOT NULL,    -- it opened a payload sealed for our epoch
        synced INTEGER NOT NULL,        -- we applied its Sync for both current epochs
        we_lost INTEGER NOT NULL,       -- our numbering toward it is provisional
        synced_after INTEGER NOT NULL   -- meta.losses when we last synced with it
    );
    -- Epochs of a peer's earlier stores: their payloads are never accepted again.
    CREATE TABLE retired_epochs (
        peer TEXT NOT NULL, epoch INTEGER NOT NULL,
        PRIMARY KEY (peer, epoch)
    );
    DROP TABLE seal_in;
    DELETE FROM seal_out;
    -- base: frames above it were numbered while our store had lost state toward
    -- this peer; they move above the peer's watermark at the next Sync.
    -- doubt: frames up to it may have reached an earlier store of the peer.
    ALTER TABLE out_streams ADD COLUMN base INTEGER;
    ALTER TABLE out_streams ADD COLUMN doubt INTEGER NOT NULL DEFAULT 0;
    -- doubt: commands up to it may have reached an earlier store of this node and
    -- are not run (reported interrupted) unless they ask to be re-run.
    ALTER TABLE in_streams ADD COLUMN doubt INTEGER NOT NULL DEFAULT 0;
    -- local: a result this node wrote itself (expired before delivery, lost with a
    -- store); a result from the peer replaces it.
    ALTER TABLE results ADD COLUMN local INTEGER NOT NULL DEFAULT 0;
    -- root: for a file shared from share_dirs, the share directory; `path` is then
    -- below it and is only ever opened without following symlinks.
    ALTER TABLE transfers ADD COLUMN root TEXT;
    -- When a frame arrived here, on the wall clock and the monotonic one (with the
    -- boot it counts from): its ttl is measured from these, not from the wall clock
    -- alone.
    ALTER TABLE inbox ADD COLUMN recv_ms INTEGER;
    ALTER TABLE inbox ADD COLUMN recv_mono INTEGER;
    ALTER TABLE inbox ADD COLUMN recv_boot INTEGER;
    -- A command with a ttl expires at the sender too, if it is still unsent.
    ALTER TABLE outbox ADD COLUMN expires_ms INTEGER;
    ALTER TABLE outbox ADD COLUMN expires_mono INTEGER;
    ALTER TABLE outbox ADD COLUMN boot INTEGER;
    CREATE INDEX outbox_expiring ON outbox (expires_ms) WHERE expires_ms IS NOT NULL;
    ",
    // 6 -> 7: cancelling. `cancels` keeps a cancel that came before its command
    // (or while the command waited behind a gap) until the command comes; `place`
    // says which. `key` on a job target: a newer command with the same key for the
    // same node supersedes it while it has not started.
    "
    CREATE TABLE cancels (
        peer TEXT NOT NULL, lane TEXT NOT NULL, seq INTEGER NOT NULL,
        stop INTEGER NOT NULL,
        reason TEXT NOT NULL,
        place TEXT NOT NULL CHECK (place IN ('inbox', 'flight')),
        fp INTEGER NOT NULL,            -- the command's fingerprint, 0: any
        at_ms INTEGER NOT NULL,
        PRIMARY KEY (peer, lane, seq)
    );
    ALTER TABLE job_targets ADD COLUMN key TEXT;
    -- The command frame's fingerprint (frame::fingerprint), which cancels carry.
    ALTER TABLE job_targets ADD COLUMN fp INTEGER;
    CREATE INDEX job_targets_key ON job_targets (node, key) WHERE key IS NOT NULL;
    CREATE INDEX job_targets_open ON job_targets (node, job) WHERE result IS NULL;
    ",
    // 7 -> 8: facts and the node registry. `facts_sent`: per peer, the facts as of
    // the last Facts frame this node queued to it (the next is a change against
    // them), for which of the peer's stores and ours, and when the last full set
    // went. `nodes`: per peer, when it was last seen (any authenticated payload,
    // written at most once a minute) and the facts it reported. Events are looked
    // up per peer for the registry's last error.
    "
    CREATE TABLE facts_sent (
        peer TEXT PRIMARY KEY,
        peer_epoch INTEGER NOT NULL,
        my_epoch INTEGER NOT NULL,
        full_ms INTEGER NOT NULL,
        facts BLOB NOT NULL             -- postcard of [(key, value)], sorted
    );
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        last_seen_ms INTEGER,
        facts_ms INTEGER,               -- when its last Facts frame was taken
        facts BLOB                      -- postcard of [(key, value)], sorted
    );
    CREATE INDEX events_peer ON events (peer, id);
    ",
    // 8 -> 9: retention (store/retention.rs). Each prune query walks one of these
    // or a range of row ids, never the whole history; `job_targets_result` also
    // serves the foreign-key check when a result is deleted.
    "
    CREATE INDEX jobs_created ON jobs (created_ms);
    CREATE INDEX job_targets_result ON job_targets (result);
    CREATE INDEX results_at ON results (at_ms);
    CREATE INDEX journal_done ON journal (finished_ms) WHERE state = 'done';
    ",
    // 9 -> 10: results to files (`send --output-dir --async`): where the agent
    // writes a job's results, and which targets' it has written (pending until all).
    "
    CREATE TABLE job_outputs (
        job INTEGER PRIMARY KEY REFERENCES jobs (id),
        dir TEXT NOT NULL,
        append INTEGER NOT NULL,
        pending INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX job_outputs_pending ON job_outputs (job) WHERE pending = 1;
    CREATE TABLE job_outputs_written (
        job INTEGER NOT NULL REFERENCES job_outputs (job),
        node TEXT NOT NULL,
        error TEXT,                     -- why writing failed, if it did
        PRIMARY KEY (job, node)
    );
    ",
    // 10 -> 11: the central error log: what nodes reported (`Body::Errors`), one
    // row per (node, kind, text) with counts added up; `seq` goes up with every
    // change, so `errors --follow` asks for what changed after the last it saw.
    "
    CREATE TABLE node_errors (
        id INTEGER PRIMARY KEY,
        node TEXT NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL,
        count INTEGER NOT NULL,
        first_ms INTEGER NOT NULL,
        last_ms INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        UNIQUE (node, kind, text)
    );
    CREATE UNIQUE INDEX node_errors_seq ON node_errors (seq);
    ",
    // 11 -> 12: what the link spent (`store/usage.rs`): bytes on the wire per hour
    // and category, per day and peer, and each budget's spending this period.
    "
    CREATE TABLE usage (
        hour INTEGER NOT NULL,          -- hours since the epoch
        category TEXT NOT NULL,
        up INTEGER NOT NULL, down INTEGER NOT NULL,
        PRIMARY KEY (hour, category)
    ) WITHOUT ROWID;
    CREATE TABLE peer_usage (
        day INTEGER NOT NULL,           -- days since the epoch
        peer TEXT NOT NULL,
        up INTEGER NOT NULL, down INTEGER NOT NULL,
        PRIMARY KEY (day, peer)
    ) WITHOUT ROWID;
    CREATE TABLE budget_spent (
        scope TEXT NOT NULL,            -- '' for the node's own budgets, else a peer
        budget TEXT NOT NULL,           -- as configured: 5MiB/day
        start_ms INTEGER NOT NULL,      -- the period it is for
        bytes INTEGER NOT NULL,
        PRIMARY KEY (scope, budget)
    ) WITHOUT ROWID;
    ",
    // 12 -> 13: on-demand links. A peer whose presence said it sleeps until its
    // next poll (`offline next=T every=S`, or a last will `offline every=S`): its
    // poll interval and when it is next expected, on its clock. Cleared by a plain
    // `offline` (an always-on link's will); kept while it is online.
    "
    ALTER TABLE peers ADD COLUMN poll_every_ms INTEGER;
    ALTER TABLE peers ADD COLUMN poll_next_ms INTEGER;
    ",
];

/// Brings the database to the newest version, one transaction per step.
pub(super) fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// The version a fully migrated database has.
pub(super) fn latest() -> usize {
    MIGRATIONS.len()
}
