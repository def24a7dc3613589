//! Apply: a run of remote events (one stream's frame) into the local database, exactly once.
//!
//! One write transaction per attempt. Order inside it:
//! 1. the applier's mark (capture triggers skip its writes) and the frontiers;
//! 2. admission against the frontiers (`store::admit`): loops, duplicates, gaps;
//! 3. the rows the run touches are locked where the dialect needs it (PostgreSQL: an
//!    application transaction that changed one has committed by now, and none can until we
//!    commit). The first tries lock without waiting, so the applier never waits for a row
//!    while holding others, which could deadlock with an application taking the same rows
//!    in another order;
//! 4. the drain of pending local changes, so a remote event never overwrites an undrained
//!    local change: the race becomes a visible conflict;
//! 5. remote clocks observed, then decisions and writes by `store::engine`;
//! 6. row metadata, relayed log entries, frontiers and clock; commit. The caller
//!    acknowledges only after commit, so a crash at any point neither loses nor doubles an
//!    event.
//!
//! Dead letters are retried through the same attempt, as a run of their one event that
//! skips admission (it passed its frontier when it first arrived) and relaying; so are the
//! pages of a snapshot (`store::snapshot`), whose rows are states, not stream positions, and
//! which record the join's progress (and, at its end, the frontiers it reached) in the same
//! transaction.
//!
//! Retries: a grouped write the database refuses for its content rolls the attempt back and
//! the run is replayed event by event, which dead-letters exactly the refused events; a run
//! that lost a race with an application insert is retried; a run whose rows are held is
//! retried shortly, and after [`NOWAIT_FOR`] waits for its locks.
use std::time::Duration;

use crate::event::Event;
use crate::store::admit::admit;
use crate::store::backend::{Backend, Conn, Meta, Txn};
use crate::store::engine::{self, Halt, Mode, Stop};
use crate::store::replica::Replica;
use crate::store::{ApplyReport, RetryReport, StoreError};

/// How many due dead letters one round of retries takes.
const RETRY_ROUND: i64 = 100;

/// How many times a run is retried after losing a race with an application insert.
const MAX_RACES: usize = 20;

/// How long a run keeps trying to lock its rows without waiting before it waits (up to the
/// dialect's lock timeout). Application transactions are usually far shorter.
const NOWAIT_FOR: Duration = Duration::from_secs(2);

/// What a run of events is.
#[derive(Clone, Copy)]
pub(crate) enum RunKind<'a> {
    /// A frame of a peer's stream: admitted against the frontiers, relayed onwards; with
    /// the position to resume the source at, recorded in the same transaction.
    Stream(Option<&'a crate::store::Position>),
    /// The retry of dead letter `id`, tried `attempts` times so far.
    Retry { id: i64, attempts: u32 },
    /// A page of a snapshot being joined.
    Snapshot(&'a crate::store::snapshot::Install),
}

/// How one attempt ended; only `Done` committed anything. One lives at a time, briefly.
#[allow(clippy::large_enum_variant)]
enum Attempt {
    Done(ApplyReport),
    Stopped(Stop),
    /// A row of the run is locked by another transaction (only when locking without waiting).
    Busy,
}

impl<B: Backend> Replica<B> {
    /// Applies a run of remote events in one transaction (retried as the module doc says).
    pub async fn apply(&self, events: Vec<Event>) -> Result<ApplyReport, StoreError> {
        self.run(events, RunKind::Stream(None)).await
    }

    /// Applies a run read from a stream source (a Kafka topic) and records, in the same
    /// transaction, where reading resumes: the position moves exactly when the rows do (not
    /// when the run has a gap: the skipped events are still to be read from there).
    pub async fn apply_from(
        &self,
        events: Vec<Event>,
        position: &crate::store::Position,
    ) -> Result<ApplyReport, StoreError> {
        self.run(events, RunKind::Stream(Some(position))).await
    }

    /// Records a position on its own (a publisher's: how far its log is in its topic).
    pub async fn record_position(&self, position: &crate::store::Position) -> Result<(), StoreError> {
        self.with_writer(
            async |this: &Self, conn: &mut crate::store::backend::Conn<B>, _: &mut u64| {
                let mut tx = sqlx::Connection::begin_with(conn, sqlx::AssertSqlSafe(B::BEGIN)).await?;
                this.backend.txn(&this.tables(), &mut tx).set_position(position).await?;
                tx.commit().await?;
                Ok(())
            },
        )
        .await
    }

    /// Where reading `source` resumes, as the last `apply_from` left it.
    pub async fn position(&self, source: &str) -> Result<Option<i64>, StoreError> {
        let mut read = self.backend.begin_read().await?;
        let position = self.backend.txn(&self.tables(), &mut read).position(source).await?;
        read.commit().await?;
        Ok(position)
    }

    /// Retries the dead letters whose retry is due, oldest first, each in its own
    /// transaction, as the applier. A letter whose event now applies, or that a later
    /// version of its row has superseded, is removed; one refused again keeps the new
    /// reason and is tried again later (backing off from a second to an hour). The order is
    /// arrival order, so a parent dead-lettered before its child is retried first. With
    /// `applied_since` (rows were applied since the last round), letters a missing parent
    /// row refused are due at once, backoff or not: the parent may be among those rows.
    pub async fn retry_dead_letters(&self, applied_since: bool) -> Result<RetryReport, StoreError> {
        // Read beside the writer: a round with nothing due takes no write lock.
        let mut read = self.backend.begin_read().await?;
        let due = self
            .backend
            .txn(&self.tables(), &mut read)
            .due_dead_letters(RETRY_ROUND, applied_since)
            .await?;
        read.commit().await?;
        let mut out = RetryReport::default();
        for (id, bytes, attempts) in due {
            let event = match crate::wire::decode_event(&bytes) {
                Ok(event) => event,
                Err(error) => {
                    tracing::warn!(letter = id, %error, "a dead letter's stored event does not decode; left as it is");
                    out.refused += 1;
                    continue;
                }
            };
            let report = self.run(vec![event], RunKind::Retry { id, attempts }).await?;
            if report.dead_lettered == 0 {
                tracing::info!(letter = id, "a dead letter applied on retry");
                out.applied += 1;
            } else {
                out.refused += 1;
            }
        }
        Ok(out)
    }

    /// Applies remote events as `kind` says (a retried dead letter's event is `events` alone).
    pub(crate) async fn run(&self, events: Vec<Event>, kind: RunKind<'_>) -> Result<ApplyReport, StoreError> {
        self.with_writer(async |store: &Self, conn: &mut Conn<B>, last_seq: &mut u64| {
            let started = std::time::Instant::now();
            let mut mode = Mode::Grouped;
            let mut busy = 0u32;
            let mut races = 0;
            while races < MAX_RACES {
                let nowait = started.elapsed() < NOWAIT_FOR;
                match store.attempt(conn, (&events, kind), mode, last_seq, nowait).await? {
                    Attempt::Done(report) => {
                        let ms = started.elapsed().as_secs_f64() * 1e3;
                        tracing::debug!(events = events.len(), ms, "applied");
                        return Ok(report);
                    }
                    Attempt::Stopped(Stop::Refused) => {
                        tracing::debug!("a grouped write was refused; replaying the run event by event");
                        mode = Mode::EventByEvent;
                    }
                    Attempt::Stopped(Stop::Raced) => {
                        tracing::debug!("an application insert raced the run; retrying it");
                        races += 1;
                    }
                    Attempt::Busy => {
                        busy += 1;
                        tracing::debug!(busy, "a row of the run is locked by the application; retrying the run");
                        tokio::time::sleep(Duration::from_millis(1 << busy.min(6))).await;
                    }
                }
            }
            Err(StoreError::Contended(format!(
                "the application kept inserting rows this run was inserting ({MAX_RACES} tries); retrying later"
            )))
        })
        .await
    }

    async fn attempt(
        &self,
        conn: &mut Conn<B>,
        (events, kind): (&[Event], RunKind<'_>),
        mode: Mode,
        last_seq: &mut u64,
        nowait: bool,
    ) -> Result<Attempt, StoreError> {
        let mut tx = sqlx::Connection::begin_with(conn, sqlx::AssertSqlSafe(B::BEGIN)).await?;
        let tables = self.current_tables(&mut tx).await?;
        let mut txn = self.backend.txn(&tables, &mut tx);
        let mut frontiers = txn.begin_apply().await?;
        let retrying = match kind {
            RunKind::Retry { id, attempts } => Some((id, attempts)),
            _ => None,
        };
        let mut report = ApplyReport {
            retrying,
            dead_letter_limit: self.dead_letter_limit,
            ..ApplyReport::default()
        };
        // A dead letter's event passed its frontier when it first arrived.
        let admitted = match kind {
            RunKind::Stream(_) => admit(&self.identity.node, events, &mut frontiers, &mut report),
            RunKind::Retry { .. } | RunKind::Snapshot(_) => events.iter().collect(),
        };
        if !txn.lock_rows(&admitted, nowait).await? {
            return Ok(Attempt::Busy);
        }
        report.drained = self.drain_in(&mut txn, crate::store::capture::Drain::All).await?;
        for event in &admitted {
            if let Err(skew) = self.clock.observe_now(event.hlc) {
                report.skew.push(skew);
            }
        }
        // Relays pass events on as they came; only this region's apply fits them to its tables.
        let fitted = crate::store::evolve::fit_all(&tables, &admitted, &mut report.columns_dropped);
        let fitted: Vec<&Event> = fitted.iter().map(AsRef::as_ref).collect();
        let written = match engine::apply_events(&mut txn, &fitted, &mut report, mode).await {
            Ok(written) => written,
            Err(Halt::Stop(stop)) => return Ok(Attempt::Stopped(stop)),
            Err(Halt::Store(error)) => return Err(error),
        };
        // Every admitted event of a relayed origin is kept, whatever its local outcome: a
        // table this node does not replicate may well be replicated further along.
        let relayed: Vec<Event> = admitted
            .iter()
            .filter(|e| matches!(kind, RunKind::Stream(_)) && self.relayed.contains(&e.origin))
            .map(|e| {
                let mut relayed = (*e).clone();
                relayed.path.push(self.identity.node.clone());
                relayed
            })
            .collect();
        if let RunKind::Snapshot(install) = kind {
            install.record(&mut txn, &mut frontiers).await?;
        }
        let meta = Meta {
            versions: written
                .iter()
                .map(|w| (w.table.as_str(), w.key.as_slice(), &w.version))
                .collect(),
            log: relayed.iter().collect(),
            frontiers: frontiers
                .iter()
                .filter(|(_, f)| f.changed)
                .map(|(o, f)| (o.as_str(), f.seq, f.processed))
                .collect(),
            hlc: self.clock.last().0,
            ..Meta::default()
        };
        txn.write_meta(meta).await?;
        // A gap applied nothing of its origin past the frontier: reading must come back to
        // it, so the position stays where the skipped events still are.
        if let RunKind::Stream(Some(position)) = kind
            && report.gap.is_none()
        {
            txn.set_position(position).await?;
        }
        if let Some((letter, _)) = retrying.filter(|_| report.dead_lettered == 0) {
            txn.delete_dead_letter(letter).await?;
        }
        txn.end_apply().await?;
        drop(txn);
        tx.commit().await?;
        *last_seq = report.drained.last_seq;
        report.frontiers = frontiers.into_iter().map(|(o, f)| (o, f.seq)).collect();
        Ok(Attempt::Done(report))
    }
}
