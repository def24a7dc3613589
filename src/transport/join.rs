//! Joining by snapshot over gRPC: the `Snapshot` call a peer serves, and the join a node runs
//! when it cannot catch up from its peers' logs (see `store::snapshot` for what a snapshot
//! holds and why pages need not be one point in time).
//!
//! A join starts when a peer's feeder finds this node behind its log and says so with a
//! `Reseed` frame, when the history gate finds this database went back in time (from the
//! peer that has most of its events), or at start when the database holds a join in
//! progress. Requests that come while a join runs wait for their turn. It copies every
//! replicated table from that one peer in chunks of `snapshot_page_rows`, installing each
//! chunk with the join's progress in one transaction, so a crash or a lost connection resumes
//! after the last chunk installed. The serving side reads a chunk only when the previous one
//! has been taken (a channel of two), so neither side holds more than a few chunks.
//!
//! Before any table, the source sends its dead letters, which the joiner keeps as its own
//! (`store::snapshot` says why).
//!
//! While a node joins, `weft status` says so and the node serves no snapshot of its own.
//! Streams keep flowing both ways meanwhile: an event the copy already includes is stale by
//! its version vector and changes nothing.
use std::io::IsTerminal as _;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::Context;
use super::grpc::{TransportError, dial};
use super::handshake::{self, Hello};
use crate::clock::now_micros;
use crate::config::NodeSpec;
use crate::event::NodeId;
use crate::shutdown::stopped;
use crate::store::backend::CopiedLetter;
use crate::store::snapshot::{JoinState, SnapshotRow, Sweep};
use crate::wire::{self, PROTOCOL, frontiers_from_proto, frontiers_to_proto, proto};

/// Most rows one chunk carries, whatever the joiner asks: a chunk is one message and one
/// transaction at the joiner.
pub const MAX_PAGE_ROWS: usize = 10_000;

/// Why a node should join from `peer`: it needs `origin`'s events from `needs` on, which the
/// peer's log no longer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    pub peer: NodeId,
    pub origin: NodeId,
    pub needs: u64,
    pub reason: String,
}

impl JoinRequest {
    /// `peer` has more of this node's (`me`) own events than its database holds.
    pub fn went_back(peer: &str, me: &str, went_back: &super::handshake::WentBack) -> Self {
        Self {
            peer: peer.to_owned(),
            origin: me.to_owned(),
            needs: went_back.peer_has,
            reason: went_back.to_string(),
        }
    }
}

/// Serves a snapshot to `request`'s node, chunk by chunk, from a task of its own.
pub async fn serve(
    ctx: Context,
    request: proto::SnapshotRequest,
) -> Result<ReceiverStream<Result<proto::SnapshotChunk, Status>>, Status> {
    let hello = request.hello.clone().unwrap_or_default();
    let claim = Hello {
        protocol: hello.protocol,
        node: &hello.node_id,
        mesh: &hello.mesh,
    };
    handshake::check_hello(claim, &ctx.config.topology, &ctx.config.node)
        .map_err(|refusal| Status::permission_denied(refusal.to_string()))?;
    if let Some(source) = ctx.joining.borrow().clone() {
        return Err(Status::unavailable(format!(
            "{} is itself joining from {source} and has no current copy to give; ask another peer",
            ctx.config.node
        )));
    }
    let start = ctx
        .store
        .snapshot_start()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let rows = (request.max_rows as usize).clamp(1, MAX_PAGE_ROWS);
    tracing::info!(peer = %hello.node_id, resume_table = %request.table, rows = start.table_rows.values().sum::<u64>(), "serving a snapshot");
    let (tx, rx) = mpsc::channel(2);
    let first = proto::SnapshotChunk {
        frontiers: frontiers_to_proto(&start.frontiers),
        table_rows: start.table_rows.clone().into_iter().collect(),
        ..Default::default()
    };
    tokio::spawn(async move {
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        // A join that resumes in a table has its letters already.
        if request.table.is_empty() && !send_letters(&ctx, &tx).await {
            return;
        }
        let tables = start.table_rows.keys().filter(|t| **t >= request.table);
        for table in tables {
            let mut after = if *table == request.table {
                request.after_key.clone()
            } else {
                Vec::new()
            };
            loop {
                let chunk = match chunk_of(&ctx, table, &mut after, rows).await {
                    Ok(chunk) => chunk,
                    Err(error) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!("reading the snapshot: {error}"))))
                            .await;
                        return;
                    }
                };
                let table_done = chunk.table_done;
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
                if table_done {
                    break;
                }
            }
        }
        let _ = tx
            .send(Ok(proto::SnapshotChunk {
                done: true,
                ..Default::default()
            }))
            .await;
    });
    Ok(ReceiverStream::new(rx))
}

/// Sends every dead letter a joiner keeps (`store::snapshot`), in chunks; `false` if the
/// joiner went away or the letters could not be read (said to the joiner).
async fn send_letters(ctx: &Context, tx: &mpsc::Sender<Result<proto::SnapshotChunk, Status>>) -> bool {
    let mut after = 0;
    loop {
        let budget = ctx.config.replication.frame_budget();
        let (letters, more) = match ctx.store.snapshot_letters(after, budget).await {
            Ok(page) => page,
            Err(error) => {
                let status = Status::unavailable(format!("reading the dead letters: {error}"));
                let _ = tx.send(Err(status)).await;
                return false;
            }
        };
        if let Some(last) = letters.last() {
            after = last.id;
        }
        if !letters.is_empty() {
            let chunk = proto::SnapshotChunk {
                letters: letters.iter().map(letter_to_proto).collect(),
                ..Default::default()
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return false;
            }
        }
        if !more {
            return true;
        }
    }
}

/// The next chunk of `table` after the key bytes `after` (moved past its rows), with the
/// purge floor read after them: every tombstone purged before the rows were read is below it.
async fn chunk_of(
    ctx: &Context,
    table: &str,
    after: &mut Vec<u8>,
    rows: usize,
) -> Result<proto::SnapshotChunk, crate::store::StoreError> {
    let budget = ctx.config.replication.frame_budget();
    let (page, more) = ctx.store.snapshot_page(table, after, rows, budget).await?;
    let floor = ctx.store.purge_floor().await?;
    if let Some(last) = page.last() {
        *after = last.row.key.to_bytes();
    }
    Ok(proto::SnapshotChunk {
        table: table.to_owned(),
        rows: page.iter().map(row_to_proto).collect(),
        purge_floor: wire::vector_to_proto(&floor),
        table_done: !more,
        ..Default::default()
    })
}

fn letter_to_proto(letter: &CopiedLetter) -> proto::CopiedLetter {
    proto::CopiedLetter {
        origin: letter.origin.clone(),
        seq: letter.seq,
        table: letter.table.clone(),
        key: letter.key.clone(),
        reason: letter.reason.clone(),
        cause: letter.cause.clone(),
        event: letter.event.clone(),
    }
}

fn letter_from_proto(letter: proto::CopiedLetter) -> CopiedLetter {
    CopiedLetter {
        id: 0,
        origin: letter.origin,
        seq: letter.seq,
        table: letter.table,
        key: letter.key,
        reason: letter.reason,
        cause: letter.cause,
        event: letter.event,
    }
}

fn row_to_proto(row: &SnapshotRow) -> proto::SnapshotRow {
    proto::SnapshotRow {
        row: Some(wire::event_to_proto(&row.row)),
        siblings: row.siblings.iter().map(wire::event_to_proto).collect(),
    }
}

fn row_from_proto(row: proto::SnapshotRow) -> Result<SnapshotRow, wire::WireError> {
    let event = row.row.ok_or(wire::WireError::Malformed {
        origin: String::new(),
        seq: 0,
        what: "a snapshot row without its row",
    })?;
    Ok(SnapshotRow {
        row: wire::event_from_proto(event)?,
        siblings: row
            .siblings
            .into_iter()
            .map(wire::event_from_proto)
            .collect::<Result<_, _>>()?,
    })
}

/// Runs joins until shutdown: the one the database holds in progress first, then one for
/// each request that is still true when its turn comes.
pub async fn join_loop(ctx: Context, mut requests: mpsc::Receiver<JoinRequest>) {
    let mut shutdown = ctx.shutdown.clone();
    let mut pending = match ctx.store.join_state().await {
        Ok(state) => state,
        Err(error) => {
            tracing::error!(%error, "cannot read the join in progress; it will not resume");
            None
        }
    };
    loop {
        let state = match pending.take() {
            Some(state) => state,
            None => {
                let request = tokio::select! {
                    _ = stopped(&mut shutdown) => return,
                    request = requests.recv() => match request { Some(r) => r, None => return },
                };
                match still_needed(&ctx, &request).await {
                    true => JoinState {
                        source: request.peer,
                        reason: request.reason,
                        started_micros: now_micros(),
                        ..JoinState::default()
                    },
                    false => continue,
                }
            }
        };
        ctx.joining.send_replace(Some(state.source.clone()));
        let finished = join_until_done(&ctx, state).await;
        ctx.joining.send_replace(None);
        if !finished {
            return;
        }
    }
}

/// Whether a request still holds: this node may have caught up since it was sent (another
/// join, or the events arrived by another way).
async fn still_needed(ctx: &Context, request: &JoinRequest) -> bool {
    let have = if request.origin == ctx.config.node {
        ctx.store.last_seq().await
    } else {
        match ctx.store.frontiers().await {
            Ok(frontiers) => frontiers.get(&request.origin).copied().unwrap_or(0),
            Err(_) => 0,
        }
    };
    if have + 1 > request.needs {
        tracing::debug!(?request, have, "a re-seed request no longer holds");
        return false;
    }
    true
}

/// One join, retried from where it stands after each failure; `false` if shutdown came first.
async fn join_until_done(ctx: &Context, mut state: JoinState) -> bool {
    let mut shutdown = ctx.shutdown.clone();
    let Some(peer) = ctx.config.topology.nodes.iter().find(|n| n.id == state.source).cloned() else {
        tracing::error!(source = %state.source, "the join's source is not in the topology any more; the join is abandoned: restart with the topology that has it");
        return true;
    };
    tracing::warn!(source = %state.source, reason = %state.reason, "joining the mesh by snapshot: this node's tables are not current until it finishes");
    let mut failures = 0u32;
    loop {
        let result = tokio::select! {
            _ = stopped(&mut shutdown) => return false,
            result = join_once(ctx, &peer, &mut state) => result,
        };
        match result {
            Ok(()) => return true,
            Err(error) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(source = %peer.id, %error, rows_done = state.rows_done, "snapshot interrupted; resuming after the last chunk installed");
                }
                let wait = Duration::from_millis(100 << failures.min(4));
                tokio::select! {
                    _ = stopped(&mut shutdown) => return false,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Copies what is left of the snapshot from `peer`, installing chunk by chunk.
async fn join_once(ctx: &Context, peer: &NodeSpec, state: &mut JoinState) -> Result<(), TransportError> {
    let protocol = |message: String| TransportError::Protocol {
        peer: peer.id.clone(),
        message,
    };
    let config = &ctx.config;
    let mut client = dial(ctx, peer).await?;
    let request = proto::SnapshotRequest {
        hello: Some(proto::Hello {
            protocol: PROTOCOL,
            node_id: config.node.clone(),
            region: config.region().to_owned(),
            mesh: config.topology.mesh.clone(),
            knows_of_you: 0,
        }),
        table: state.table.clone(),
        after_key: state.after_key(),
        max_rows: config.replication.snapshot_page_rows as u32,
    };
    let refused = |status| TransportError::Refused {
        peer: peer.id.clone(),
        status,
    };
    let mut chunks = client.snapshot(request).await.map_err(refused)?.into_inner();
    let first = chunks
        .message()
        .await
        .map_err(refused)?
        .ok_or_else(|| protocol("the snapshot ended before it began".into()))?;
    if state.frontiers.is_empty() && state.rows_done == 0 {
        state.frontiers = frontiers_from_proto(first.frontiers);
        state.rows_total = first.table_rows.values().sum();
        tracing::info!(source = %peer.id, rows = state.rows_total, frontiers = ?state.frontiers, "snapshot begins");
    }
    // This node's own seq goes past what the source (or any peer that answered the history
    // gate) has of it before anything is drained (the first page drains), so no change made
    // here reuses a seq the mesh already has.
    let source_has = state.frontiers.get(&config.node).copied().unwrap_or(0);
    let own = source_has.max(ctx.history.lock().expect("history lock").most_known());
    let ours = ctx.store.last_seq().await;
    if own > ours {
        ctx.store.raise_own_seq(own).await?;
        tracing::warn!(
            source = %peer.id,
            "this node's own events {}..={own} are in {}'s copy and come back with the snapshot; \
             any of its events after seq {own} that no peer acknowledged are lost (the RPO of this restore)",
            ours + 1,
            peer.id
        );
    }
    ctx.history_heard(&peer.id, source_has, own.max(ours));
    ctx.reconsider_history().await;
    let mut progress = Progress::new(state);
    while let Some(chunk) = chunks.message().await.map_err(refused)? {
        if chunk.done {
            let frontiers = state.frontiers.clone();
            ctx.store.install_page(Vec::new(), None, &frontiers).await?;
            progress.finish(state, &peer.id);
            return Ok(());
        }
        if !chunk.letters.is_empty() {
            let letters: Vec<CopiedLetter> = chunk.letters.into_iter().map(letter_from_proto).collect();
            let copied = ctx.store.copy_letters(&letters).await?;
            if copied > 0 {
                tracing::warn!(
                    source = %peer.id, letters = copied,
                    "joining: kept the source's dead letters as this node's (events its copy lacks); `weft dead-letters list` shows them"
                );
            }
            continue;
        }
        let report = install_chunk(ctx, chunk, state).await?;
        crate::crashpoint::hit("after-snapshot-page");
        ctx.observer.joined_rows(report.applied + report.stale);
        progress.advance(state);
    }
    Err(protocol("the snapshot stream ended before its last chunk".into()))
}

/// Installs one chunk of rows and records the join's progress after it.
async fn install_chunk(
    ctx: &Context,
    chunk: proto::SnapshotChunk,
    state: &mut JoinState,
) -> Result<crate::store::ApplyReport, TransportError> {
    let rows = chunk
        .rows
        .into_iter()
        .map(row_from_proto)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TransportError::Protocol {
            peer: state.source.clone(),
            message: format!("a snapshot row does not decode: {e}"),
        })?;
    let sweep = sweep_of(&chunk.table, &chunk.purge_floor, chunk.table_done, &rows, state);
    if state.table != chunk.table {
        state.set_after_key(&[]);
    }
    state.table = chunk.table;
    if let Some(last) = rows.last() {
        state.set_after_key(&last.row.key.to_bytes());
    }
    state.rows_done += rows.len() as u64;
    let frontiers = state.frontiers.clone();
    Ok(ctx
        .store
        .install_page_swept(rows, Some(state.clone()), &frontiers, sweep)
        .await?)
}

/// The rows of this node a chunk shows deleted and purged at the source: in the chunk's key
/// range of its table, after where the join stood in it (`store::snapshot::Sweep`).
fn sweep_of(
    table: &str,
    floor: &[proto::VersionEntry],
    table_done: bool,
    rows: &[SnapshotRow],
    state: &JoinState,
) -> Sweep {
    Sweep {
        table: table.to_owned(),
        after: match state.table == table {
            true => state.after_key(),
            false => Vec::new(),
        },
        upto: match table_done {
            true => None,
            false => rows.last().map(|r| r.row.key.to_bytes()),
        },
        keys: rows.iter().map(|r| r.row.key.to_bytes()).collect(),
        floor: wire::vector_from_proto(floor),
    }
}

/// How a join shows its progress: a bar on a terminal, else a log line every five seconds.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    rows_at_start: u64,
    logged: Instant,
}

impl Progress {
    fn new(state: &JoinState) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(state.rows_total.max(state.rows_done));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "joining from {msg} [{bar:40}] {pos}/{len} rows, {per_sec}, eta {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message(state.source.clone());
            bar.set_position(state.rows_done);
            bar
        });
        Self {
            bar,
            started: Instant::now(),
            rows_at_start: state.rows_done,
            logged: Instant::now(),
        }
    }

    fn advance(&mut self, state: &JoinState) {
        if let Some(bar) = &self.bar {
            bar.set_position(state.rows_done);
        }
        if self.logged.elapsed() >= Duration::from_secs(5) {
            self.logged = Instant::now();
            tracing::info!(source = %state.source, rows_done = state.rows_done, rows_total = state.rows_total, table = %state.table, "joining");
        }
    }

    fn finish(&self, state: &JoinState, source: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let secs = self.started.elapsed().as_secs_f64();
        let copied = state.rows_done - self.rows_at_start;
        let rows_per_s = copied as f64 / secs.max(1e-3);
        tracing::info!(%source, rows = state.rows_done, resumed_at = self.rows_at_start, secs, rows_per_s = rows_per_s.round(), "joined the mesh: the snapshot is installed; catching up from the peers' logs");
    }
}
