//! Admission of decoded events against a real store: a batch built from the fuzzer's
//! choices (origins, regions, seqs near the frontier, clocks, tables, keys, values, versions,
//! paths, CRDT states, ownership claims) goes through the wire decoder and the transport's
//! checks as a peer's batch would, and what is admitted is applied to a real SQLite
//! database holding a table of each strategy.
//!
//! It must never panic, and an admitted batch must never fail to apply: an error there
//! would refuse the batch, and the peer would resend it forever (a wedged link). Whatever a
//! peer sends ends applied, stale, a duplicate, a conflict or a dead letter.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use weft::config::{Database, TableConfig, Topology};
use weft::crdt::CrdtType;
use weft::event::Identity;
use weft::store::{Store, StoreError};
use weft::transport::admission::Admission;
use weft::wire::{self, proto};

const NODES: [&str; 5] = ["n0", "n1", "n2", "mallory", ""];
const REGIONS: [&str; 4] = ["r0", "r1", "r2", "atlantis"];
const TABLES: [&str; 5] = ["t", "c", "o", "q", "nowhere"];
const COLUMNS: [&str; 5] = ["id", "v", "n", "home", "zzz"];

#[derive(Arbitrary, Debug)]
struct Input {
    /// n1 or n2: the peer the batch comes from.
    peer: bool,
    events: Vec<FuzzEvent>,
}

#[derive(Arbitrary, Debug)]
struct FuzzEvent {
    origin: u8,
    region: u8,
    /// Past the origin's frontier by this much (0: the next event).
    seq_ahead: u8,
    batch_more: u8,
    /// Milliseconds from now, or a raw stamp.
    clock: Clock,
    table: u8,
    key: Vec<FuzzValue>,
    op: Option<Vec<(u8, FuzzValue)>>,
    version: Vec<(u8, u32)>,
    /// None: the honest path (origin, then the peer if it relays).
    path: Option<Vec<u8>>,
    crdt: Vec<(u8, CrdtJson)>,
    ownership: Option<(u8, u8, bool)>,
    committed_at_micros: i64,
}

#[derive(Arbitrary, Debug)]
enum Clock {
    Offset(i32),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum FuzzValue {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
    Unknown,
}

#[derive(Arbitrary, Debug)]
enum CrdtJson {
    /// A PN-counter state of one actor, as weft writes them.
    Counter {
        actor: u8,
        up: u32,
        down: u32,
    },
    Raw(String),
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    store: Store,
    /// The store's frontiers, kept up to date from each apply (a read per run would set
    /// the pace).
    frontiers: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    topology: Topology,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // On tmpfs where there is one: the store syncs every commit, and the disk would set
        // the pace.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .unwrap();
        let mut text = "version = 1\nmesh = \"fuzz\"\nshape = \"all-to-all\"\n".to_string();
        for i in 0..3 {
            text += &format!(
                "[[nodes]]\nid = \"n{i}\"\nregion = \"r{i}\"\naddress = \"127.0.0.1:{}\"\n",
                7000 + i
            );
        }
        let topology = Topology::parse(&text, std::path::Path::new("fuzz.toml")).unwrap();
        let path = dir.path().join("n0.db");
        let store = runtime.block_on(async {
            let url = format!("sqlite://{}?mode=rwc", path.display());
            let app = sqlx::SqlitePool::connect(&url).await.unwrap();
            sqlx::raw_sql(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);
                 CREATE TABLE c (id INTEGER PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0);
                 CREATE TABLE o (id INTEGER PRIMARY KEY, home TEXT, v TEXT);
                 CREATE TABLE q (id INTEGER PRIMARY KEY, v TEXT);",
            )
            .execute(&app)
            .await
            .unwrap();
            app.close().await;
            let tables = [
                TableConfig::lww("t"),
                TableConfig::crdt("c", &[("n", CrdtType::Counter)]),
                TableConfig::owned_by_column("o", "home"),
                TableConfig::queue("q"),
            ];
            let identity = Identity {
                node: "n0".into(),
                region: "r0".into(),
            };
            Store::open(
                &Database::Sqlite(path),
                identity,
                &tables,
                std::time::Duration::from_millis(500),
            )
            .await
            .unwrap()
            .bounding_dead_letters(10_000)
        });
        let frontiers = std::sync::Mutex::new(runtime.block_on(store.frontiers()).unwrap());
        Fixture {
            runtime,
            frontiers,
            store,
            topology,
            _dir: dir,
        }
    })
}

fn pick<'a>(names: &[&'a str], i: u8) -> &'a str {
    names[usize::from(i) % names.len()]
}

fn value(v: &FuzzValue) -> proto::Value {
    use proto::value::Kind;
    let kind = match v {
        FuzzValue::Null => Some(Kind::Null(true)),
        FuzzValue::Integer(i) => Some(Kind::Integer(*i)),
        FuzzValue::Real(r) => Some(Kind::Real(*r)),
        FuzzValue::Text(t) => Some(Kind::Text(t.clone())),
        FuzzValue::Blob(b) => Some(Kind::Blob(b.clone())),
        FuzzValue::Unknown => None,
    };
    proto::Value { kind }
}

fn event(e: &FuzzEvent, peer: &str, frontier: u64, now_ms: i64) -> proto::Event {
    let origin = pick(&NODES, e.origin);
    let seq = frontier + 1 + u64::from(e.seq_ahead % 4);
    let hlc = match e.clock {
        Clock::Offset(ms) => hlc_gen::HlcTimestamp::from_parts(now_ms + i64::from(ms), 0).map_or(0, |t| t.as_u64()),
        Clock::Raw(raw) => raw,
    };
    let path = match &e.path {
        None if origin == peer => vec![origin.to_owned()],
        None => vec![origin.to_owned(), peer.to_owned()],
        Some(hops) => hops.iter().map(|&h| pick(&NODES, h).to_owned()).collect(),
    };
    let op = match &e.op {
        None => proto::event::Op::Delete(proto::Delete {}),
        Some(columns) => proto::event::Op::Upsert(proto::Upsert {
            columns: columns
                .iter()
                .map(|(c, v)| proto::Column {
                    name: pick(&COLUMNS, *c).to_owned(),
                    value: Some(value(v)),
                })
                .collect(),
        }),
    };
    let crdt = e
        .crdt
        .iter()
        .map(|(c, state)| proto::CrdtState {
            column: pick(&COLUMNS, *c).to_owned(),
            state: match state {
                CrdtJson::Counter { actor, up, down } => {
                    let actor = pick(&NODES, *actor);
                    format!(
                        r#"{{"Counter":{{"p":{{"dots":{{"{actor}":{up}}}}},"n":{{"dots":{{"{actor}":{down}}}}}}}}}"#
                    )
                }
                CrdtJson::Raw(raw) => raw.clone(),
            },
        })
        .collect();
    proto::Event {
        origin_node: origin.to_owned(),
        origin_region: pick(&REGIONS, e.region).to_owned(),
        seq,
        batch_end: seq + u64::from(e.batch_more % 3),
        hlc,
        table: pick(&TABLES, e.table).to_owned(),
        key: e.key.iter().take(3).map(value).collect(),
        op: Some(op),
        version: e
            .version
            .iter()
            .map(|(n, c)| proto::VersionEntry {
                node: pick(&NODES, *n).to_owned(),
                counter: u64::from(*c),
            })
            .collect(),
        path,
        committed_at_micros: e.committed_at_micros,
        crdt,
        ownership: e.ownership.map(|(owner, epoch, transfer)| proto::Ownership {
            owner: pick(&REGIONS, owner).to_owned(),
            epoch: u64::from(epoch),
            transfer,
        }),
    }
}

fuzz_target!(|input: Input| {
    let f = fixture();
    let peer = if input.peer { "n2" } else { "n1" };
    f.runtime.block_on(async {
        let frontiers = f.frontiers.lock().unwrap().clone();
        let now_ms = weft::clock::now_micros() / 1000;
        let batch: Vec<proto::Event> = (input.events.iter().take(16))
            .map(|e| {
                let origin = pick(&NODES, e.origin);
                event(e, peer, frontiers.get(origin).copied().unwrap_or(0), now_ms)
            })
            .collect();
        let Ok(events) = batch
            .into_iter()
            .map(wire::event_from_proto)
            .collect::<Result<Vec<_>, _>>()
        else {
            return;
        };
        let admission = Admission {
            topology: &f.topology,
            me: "n0",
            peer,
            relay_wanted: &[],
            max_ahead_ms: 60_000,
            now_ms,
            my_last_seq: f.store.last_seq().await,
        };
        if admission.check(&events).is_err() {
            return;
        }
        match f.store.apply(events.clone()).await {
            Ok(report) => f.frontiers.lock().unwrap().extend(report.frontiers),
            Err(StoreError::DeadLettersFull { .. }) => {}
            Err(error) => {
                panic!("an admitted batch failed to apply, so the peer would resend it forever: {error}\n{events:#?}")
            }
        }
    });
});
