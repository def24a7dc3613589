//! The web console of a sidecar: pages rendered on the server (no script, nothing fetched
//! from elsewhere) under `/console` of the operations endpoints (`http`), when `[http]
//! console = true`. It shows the mesh (per link of this node: backlog and RPO exposure of
//! what it sends, lag and frontier of what it applies, stream state, a lag chart; and every
//! link of the mesh by the frontiers the nodes gossip), the resolution queue with each conflict's versions side by side and a button to
//! keep one, the dead letters with retry and discard, and the recent resolutions, automatic
//! and by people.
//!
//! Every action goes through the same admin API as `weft conflicts` and `weft dead-letters`
//! (`store::admin`), as an ordinary application write, so it replicates like any change.
//!
//! Access: the console needs `token_file` (the config refuses it without one). A person
//! signs in with the token and a name (recorded as who resolved what); the browser keeps
//! them in `HttpOnly`, `SameSite=Strict` cookies (`Secure` over HTTPS), or a client sends
//! `Authorization: Bearer <token>`. Actions are POSTs; one whose `Origin` is another site is
//! refused, and the strict cookies are not sent cross-site anyway.
use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::clock::now_micros;
use crate::event::{Event, Op};
use crate::store::admin::{Admin, Choice, DeadLetter, Letters, OpenConflict};
use crate::telemetry::Metrics;
use crate::transport::Context;

/// What the console's pages read and act on.
#[derive(Clone)]
pub struct Console {
    pub ctx: Context,
    pub metrics: Arc<Metrics>,
    pub admin: Arc<Admin>,
    pub token: Arc<str>,
    /// Cookies carry `Secure` (the endpoints are HTTPS).
    pub https: bool,
}

const TOKEN_COOKIE: &str = "weft_console";
const NAME_COOKIE: &str = "weft_console_by";

/// The console's routes, to merge into the endpoints' router.
pub fn router(console: Console) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/console", get(mesh))
        .route("/console/login", get(login_page).post(login))
        .route("/console/conflicts", get(conflicts))
        .route("/console/conflicts/{id}/resolve", post(resolve))
        .route("/console/dead-letters", get(dead_letters))
        .route("/console/dead-letters/{id}/{action}", post(act_on_letter))
        .route("/console/resolutions", get(resolutions))
        .with_state(console)
}

/// Who is asking: the name they signed in with, if their token is right.
fn signed_in(console: &Console, headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // The cookie holds the token in hex: a token may hold bytes a cookie cannot.
    let given = match bearer {
        Some(token) => token.as_bytes().to_vec(),
        None => unhex(cookie(headers, TOKEN_COOKIE)?)?,
    };
    if !same(&given, console.token.as_bytes()) {
        return None;
    }
    let name = cookie(headers, NAME_COOKIE).filter(|n| valid_name(n));
    Some(name.unwrap_or("console").to_owned())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Compares without stopping at the first difference, so timing tells nothing of the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A name fit for a cookie and the resolutions table.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

/// An action from another site's page: its `Origin` is not this console's host.
fn cross_site(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
    origin_host != host
}

/// Off to the sign-in page.
fn sign_in_first() -> Response {
    Redirect::to("/console/login").into_response()
}

/// Who may act, or why not (a status and what to do).
fn refuse_action(headers: &HeaderMap, console: &Console) -> Result<String, (StatusCode, &'static str)> {
    if cross_site(headers) {
        return Err((
            StatusCode::FORBIDDEN,
            "refused: this action came from another site's page\n",
        ));
    }
    signed_in(console, headers).ok_or((
        StatusCode::UNAUTHORIZED,
        "sign in at /console/login with the token of [http] token_file\n",
    ))
}

const STYLE: &str = "
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:baseline}
header a{color:#dbe7f5;text-decoration:none}header a.on{color:#fff;font-weight:600}
header .node{font-weight:600;margin-right:12px}
main{padding:16px 20px;max-width:1200px}
table{border-collapse:collapse;background:#fff;margin:8px 0 20px}
th,td{border:1px solid #d5dae0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.diff{background:#fff3bf}.bad{color:#b00020;font-weight:600}.ok{color:#1b7f3b;font-weight:600}
.note{padding:8px 12px;background:#e7f5ff;border:1px solid #a5d8ff;margin-bottom:12px}
.error{padding:8px 12px;background:#fff5f5;border:1px solid #ffa8a8;margin-bottom:12px}
button{padding:3px 10px;cursor:pointer}code{font-size:12px}
";

/// A page: the navigation, a note from the last action (`done`), and `body`.
fn page(console: &Console, title: &str, done: Option<&str>, body: Markup) -> Markup {
    let config = &console.ctx.config;
    let tab = |href: &str, label: &str| {
        html! { a href=(href) class=[(label == title).then_some("on")] { (label) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "weft · " (title) " · " (config.node) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    span.node { "weft " (config.node) " (" (config.region()) ")" }
                    (tab("/console", "Mesh"))
                    (tab("/console/conflicts", "Conflicts"))
                    (tab("/console/dead-letters", "Dead letters"))
                    (tab("/console/resolutions", "Resolutions"))
                }
                main {
                    h1 { (title) }
                    @if let Some(done) = done { div.note { (done) } }
                    (body)
                }
            }
        }
    }
}

fn error_page(console: &Console, title: &str, error: &dyn std::fmt::Display) -> Response {
    let body = html! { div.error { "cannot read the database: " (error.to_string()) } };
    (StatusCode::INTERNAL_SERVER_ERROR, page(console, title, None, body)).into_response()
}

#[derive(serde::Deserialize, Default)]
struct Done {
    done: Option<String>,
}

async fn login_page(State(console): State<Console>) -> Markup {
    page(
        &console,
        "Sign in",
        None,
        html! {
            form method="post" action="/console/login" {
                p { label { "Token (the content of [http] token_file) " input type="password" name="token" autofocus; } }
                p { label { "Your name, recorded with what you resolve " input type="text" name="name" value="console"; } }
                button type="submit" { "Sign in" }
            }
        },
    )
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
    name: String,
}

async fn login(State(console): State<Console>, headers: HeaderMap, Form(form): Form<Login>) -> Response {
    if cross_site(&headers) {
        return (
            StatusCode::FORBIDDEN,
            "refused: this sign-in came from another site's page\n",
        )
            .into_response();
    }
    let name = form.name.trim();
    if !same(form.token.trim().as_bytes(), console.token.as_bytes()) || !valid_name(name) {
        let body = html! {
            div.error { "Wrong token, or a name that is not 1 to 64 letters, digits or . _ - @." }
            p { a href="/console/login" { "Try again" } }
        };
        return (StatusCode::UNAUTHORIZED, page(&console, "Sign in", None, body)).into_response();
    }
    let secure = if console.https { "; Secure" } else { "" };
    let set = |k: &str, v: &str| format!("{k}={v}; Path=/console; HttpOnly; SameSite=Strict{secure}");
    let cookies = axum::response::AppendHeaders([
        (
            header::SET_COOKIE,
            set(TOKEN_COOKIE, &hex(form.token.trim().as_bytes())),
        ),
        (header::SET_COOKIE, set(NAME_COOKIE, name)),
    ]);
    (cookies, Redirect::to("/console")).into_response()
}

/// This node's view of the mesh: what it sends to each peer, what it applies from each
/// origin, and the lag chart.
async fn mesh(State(console): State<Console>, headers: HeaderMap) -> Response {
    if signed_in(&console, &headers).is_none() {
        return sign_in_first();
    }
    let config = &console.ctx.config;
    let routed = crate::topology::routed_origins(&config.topology, &config.node);
    let status = match console.ctx.store.status(&routed).await {
        Ok(status) => status,
        Err(error) => return error_page(&console, "Mesh", &error),
    };
    let now = now_micros();
    let streams = console.metrics.peers();
    let newest = console.metrics.newest_lags();
    let history = *console.ctx.verified.borrow();
    let body = html! {
        p {
            "History " @if history { span.ok { "confirmed" } } @else { span.bad { "not confirmed yet: capture waits" } }
            " · last seq " (status.last_seq) " · outbox " (status.outbox_pending) " · log " (status.log_events) " events"
            " · dead letters " (status.dead_letters) " · open conflicts " (status.breakdown.queue_open)
            @if let Some(join) = &status.joining { " · " span.bad { "joining from " (join.source) ": " (join.rows_done) "/" (join.rows_total) " rows" } }
        }
        h2 { "Sending: what each peer has not acknowledged (the RPO if this region were lost now)" }
        table {
            tr { th { "peer" } th { "origin" } th { "stream" } th { "acknowledged" } th { "backlog" } th { "RPO exposure" } }
            @for p in &status.peers {
                tr {
                    td { (p.peer) } td { (p.origin) }
                    td { @match streams.get(&p.peer) {
                        Some(s) if s.connected => span.ok { "up" },
                        Some(_) => span.bad { "down" },
                        None => "-",
                    } }
                    td.num { (p.acked) } td.num { (p.unacked) }
                    td.num { @match p.oldest_unacked_micros { Some(at) => (format!("{:.1} s", (now - at).max(0) as f64 / 1e6)), None => "0 s" } }
                }
            }
        }
        h2 { "Applying: each origin's events here" }
        table {
            tr { th { "origin" } th { "frontier" } th { "events processed" } th { "lag of the newest applied" } }
            @for f in &status.frontiers {
                tr {
                    td { (f.origin) } td.num { (f.seq) } td.num { (f.processed) }
                    td.num { @match newest.get(&f.origin) { Some(lag) => (format!("{:.1} ms", *lag as f64 / 1000.0)), None => "-" } }
                }
            }
        }
        h2 { "The whole mesh, as its nodes report (events each node has not applied of each origin)" }
        (mesh_matrix(&console.ctx.reports.all(), now))
        h2 { "Lag, commit in the origin to apply here (worst per 5 s, last 10 minutes)" }
        (lag_chart(&console.metrics.lag_window(), now))
    };
    page(&console, "Mesh", None, body).into_response()
}

/// Every link of the mesh from the reports the nodes gossip (each node's frontier per origin,
/// its own last seq among them): per receiver and origin, how many of the origin's events
/// the receiver has not applied, by the latest reports known here, and how old they are.
fn mesh_matrix(reports: &[(String, i64, crate::stability::Frontiers)], now: i64) -> Markup {
    let last_seq = |origin: &str| {
        reports
            .iter()
            .find(|(node, _, _)| node == origin)
            .and_then(|(_, _, f)| f.get(origin).copied())
    };
    html! {
        table.mesh {
            tr { th { "receiver \\ origin" } @for (origin, _, _) in reports { th { (origin) } } th { "report age" } }
            @for (receiver, at, frontiers) in reports {
                tr {
                    th { (receiver) }
                    @for (origin, _, _) in reports {
                        @if origin == receiver { td { "-" } }
                        @else {
                            @let behind = last_seq(origin).map(|last| last.saturating_sub(frontiers.get(origin).copied().unwrap_or(0)));
                            td.num class=[behind.filter(|b| *b > 0).map(|_| "diff")] {
                                @match behind { Some(n) => (n), None => "?" }
                            }
                        }
                    }
                    td.num { (format!("{:.1} s", (now - at).max(0) as f64 / 1e6)) }
                }
            }
        }
    }
}

/// An SVG line per origin: the worst lag of each 5-second window.
fn lag_chart(window: &[(i64, std::collections::BTreeMap<String, i64>)], now: i64) -> Markup {
    const W: f64 = 900.0;
    const H: f64 = 220.0;
    const SPAN: f64 = 600e6;
    let colors = ["#1c7ed6", "#e8590c", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599"];
    let mut origins: Vec<&String> = window.iter().flat_map(|(_, m)| m.keys()).collect();
    origins.sort();
    origins.dedup();
    let top = window
        .iter()
        .flat_map(|(_, m)| m.values())
        .copied()
        .max()
        .unwrap_or(0)
        .max(1000) as f64;
    let x = |at: i64| W - ((now - at) as f64 / SPAN * W).clamp(0.0, W);
    let y = |lag: i64| H - (lag as f64 / top * H);
    html! {
        svg width=(W + 60.0) height=(H + 30.0) viewBox=(format!("-50 -10 {} {}", W + 60.0, H + 30.0)) role="img" aria-label="lag chart" {
            rect x="0" y="0" width=(W) height=(H) fill="#fff" stroke="#d5dae0" {}
            text x="-6" y="4" text-anchor="end" font-size="11" { (format!("{:.0} ms", top / 1000.0)) }
            text x="-6" y=(H) text-anchor="end" font-size="11" { "0" }
            text x="0" y=(H + 16.0) font-size="11" { "-10 min" }
            text x=(W) y=(H + 16.0) text-anchor="end" font-size="11" { "now" }
            @for (i, origin) in origins.iter().enumerate() {
                @let points: Vec<String> = window.iter().filter_map(|(at, m)| m.get(*origin).map(|lag| format!("{:.1},{:.1}", x(*at), y(*lag)))).collect();
                polyline fill="none" stroke=(colors[i % colors.len()]) stroke-width="2" points=(points.join(" ")) {}
                @for point in &points {
                    @let (px, py) = point.split_once(',').unwrap_or(("0", "0"));
                    circle cx=(px) cy=(py) r="2.5" fill=(colors[i % colors.len()]) {}
                }
                text x=(10.0 + 160.0 * i as f64) y="14" font-size="12" fill=(colors[i % colors.len()]) { (origin) }
            }
            @if origins.is_empty() { text x=(W / 2.0) y=(H / 2.0) text-anchor="middle" fill="#888" { "nothing applied in the last 10 minutes" } }
        }
    }
}

/// The resolution queue: each open conflict's versions side by side, differing values
/// marked, a button under each to keep it.
async fn conflicts(State(console): State<Console>, headers: HeaderMap, Query(done): Query<Done>) -> Response {
    if signed_in(&console, &headers).is_none() {
        return sign_in_first();
    }
    let open = match console.admin.open_conflicts().await {
        Ok(open) => open,
        Err(error) => return error_page(&console, "Conflicts", &error),
    };
    let body = html! {
        @if open.is_empty() { p { "No conflict waits for a person." } }
        @for conflict in &open { (conflict_table(conflict)) }
    };
    page(&console, "Conflicts", done.done.as_deref(), body).into_response()
}

fn cell(event: &Event, column: &str) -> String {
    match &event.op {
        Op::Upsert(row) => row.get(column).map_or_else(|| "-".to_owned(), |v| v.to_string()),
        Op::Delete => "(deleted)".to_owned(),
        Op::Undecodable { .. } => "(cannot decode)".to_owned(),
    }
}

fn conflict_table(c: &OpenConflict) -> Markup {
    let age = (now_micros() - c.opened_at_micros).max(0) as f64 / 1e6;
    html! {
        h2 id=(format!("conflict-{}", c.id)) { "Conflict " (c.id) ": " (c.table) " " (c.key_text) }
        p { "open for " (format!("{age:.0} s")) ", " (c.siblings.len()) " versions" }
        table.conflict data-conflict=(c.id) {
            tr { th { "column" } @for (i, s) in c.siblings.iter().enumerate() { th { "version " (i + 1) br; code { (s.origin) " @ " (s.hlc.to_string()) } } } }
            @for column in &c.columns {
                @let values: Vec<String> = c.siblings.iter().map(|s| cell(s, column)).collect();
                @let differs = values.iter().any(|v| *v != values[0]);
                tr { th { (column) } @for v in &values { td class=[differs.then_some("diff")] { (v) } } }
            }
            tr {
                td {}
                @for (i, s) in c.siblings.iter().enumerate() {
                    td {
                        form method="post" action=(format!("/console/conflicts/{}/resolve", c.id)) {
                            input type="hidden" name="take" value=(i + 1);
                            input type="hidden" name="origin" value=(s.origin);
                            input type="hidden" name="hlc" value=(s.hlc.0);
                            button type="submit" { "Keep version " (i + 1) }
                        }
                    }
                }
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct Take {
    take: usize,
    origin: String,
    hlc: u64,
}

async fn resolve(
    State(console): State<Console>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    Form(take): Form<Take>,
) -> Response {
    let by = match refuse_action(&headers, &console) {
        Ok(by) => by,
        Err(refused) => return refused.into_response(),
    };
    // The versions may have changed since the page was drawn: keep only the one shown.
    let shown = console.admin.conflict(id).await.ok().and_then(|c| {
        let s = c.siblings.get(take.take.wrapping_sub(1))?;
        (s.origin == take.origin && s.hlc.0 == take.hlc).then_some(())
    });
    let done = match shown {
        None => format!("Conflict {id} changed since the page was drawn (or is closed): nothing done; look again."),
        Some(()) => match console.admin.resolve(id, Choice::Take(take.take), &by).await {
            Ok(_) => format!(
                "Conflict {id} resolved by {by}: kept version {}. The resolution replicates to every region.",
                take.take
            ),
            Err(error) => format!("Conflict {id} not resolved: {error}"),
        },
    };
    back_to("/console/conflicts", &done)
}

/// A redirect after an action, with what it did for the next page to say.
fn back_to(path: &str, done: &str) -> Response {
    let query: String = url_encode(done);
    Redirect::to(&format!("{path}?done={query}")).into_response()
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn dead_letters(State(console): State<Console>, headers: HeaderMap, Query(done): Query<Done>) -> Response {
    if signed_in(&console, &headers).is_none() {
        return sign_in_first();
    }
    let letters = match console.admin.dead_letters(None).await {
        Ok(letters) => letters,
        Err(error) => return error_page(&console, "Dead letters", &error),
    };
    let body = html! {
        @if letters.is_empty() { p { "No dead letters." } }
        @else {
            p { "The sidecar retries every letter by itself, with backoff (a fenced one never: it lost to a forced ownership failover). Retry makes it due now; discard gives it up, leaving the change unapplied in this region." }
            table {
                tr { th { "id" } th { "origin" } th { "seq" } th { "table" } th { "key" } th { "cause" } th { "reason" } th { "retries" } th {} }
                @for l in &letters { (letter_row(l)) }
            }
        }
    };
    page(&console, "Dead letters", done.done.as_deref(), body).into_response()
}

fn letter_row(l: &DeadLetter) -> Markup {
    let action = |what: &str| format!("/console/dead-letters/{}/{what}", l.id);
    html! {
        tr data-letter=(l.id) {
            td.num { (l.id) } td { (l.origin) } td.num { (l.seq) } td { (l.table) } td { (l.key) }
            td { (l.cause) } td { (l.reason) } td.num { (l.attempts) }
            td {
                form method="post" action=(action("retry")) style="display:inline" {
                    button type="submit" disabled[!crate::store::backend::Cause::retried_by_name(&l.cause)] { "Retry" }
                }
                " "
                form method="post" action=(action("discard")) style="display:inline" {
                    button type="submit" { "Discard" }
                }
            }
        }
    }
}

async fn act_on_letter(
    State(console): State<Console>,
    Path((id, action)): Path<(i64, String)>,
    headers: HeaderMap,
) -> Response {
    let by = match refuse_action(&headers, &console) {
        Ok(by) => by,
        Err(refused) => return refused.into_response(),
    };
    let discard = match action.as_str() {
        "retry" => false,
        "discard" => true,
        _ => return (StatusCode::NOT_FOUND, "the actions are retry and discard\n").into_response(),
    };
    let done = match console.admin.act_on_letters(&Letters::Ids(vec![id]), discard).await {
        Ok(0) => format!("No dead letter {id} (already applied or discarded)."),
        Ok(_) if discard => {
            tracing::info!(letter = id, by = %by, "a dead letter discarded from the console");
            format!("Dead letter {id} discarded by {by}: its change stays unapplied in this region.")
        }
        Ok(_) => format!("Dead letter {id} is due now: the sidecar retries it within 5 s."),
        Err(error) => format!("Dead letter {id}: {error}"),
    };
    back_to("/console/dead-letters", &done)
}

/// The latest resolutions, by people and automatic, newest first.
async fn resolutions(State(console): State<Console>, headers: HeaderMap) -> Response {
    if signed_in(&console, &headers).is_none() {
        return sign_in_first();
    }
    let history = match console.admin.history(Some(RECENT)).await {
        Ok(history) => history,
        Err(error) => return error_page(&console, "Resolutions", &error),
    };
    let side = |v: &serde_json::Value| {
        let row = v.get("row").map_or(String::new(), |r| r.to_string());
        format!("{} {}", v.get("origin").and_then(|o| o.as_str()).unwrap_or("?"), row)
    };
    let when = |at: i64| format!("{:.0} s ago", (now_micros() - at).max(0) as f64 / 1e6);
    let body = html! {
        h2 { "By people (the resolution queue)" }
        table {
            tr { th { "conflict" } th { "table" } th { "key" } th { "by" } th { "decision" } th { "when" } }
            @for r in history.resolved.iter().rev() {
                tr { td.num { (r.queue_id) } td { (r.table) } td { (r.key) } td { (r.decided_by) } td { (r.decision) } td { (when(r.at_micros)) } }
            }
        }
        h2 { "Automatic (the latest " (RECENT) " of the conflict log)" }
        table {
            tr { th { "table" } th { "key" } th { "strategy" } th { "kept" } th { "overwritten" } th { "when" } }
            @for a in history.automatic.iter().rev() {
                tr { td { (a.table) } td { (a.key) } td { (a.strategy) } td { code { (side(&a.winner)) } } td { code { (side(&a.loser)) } } td { (when(a.at_micros)) } }
            }
        }
    };
    page(&console, "Resolutions", None, body).into_response()
}

/// How many of the latest resolutions the page shows, of each kind.
const RECENT: i64 = 50;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_names_and_origins() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "a=1; weft_console=tok; weft_console_by=ana".parse().unwrap(),
        );
        assert_eq!(cookie(&headers, TOKEN_COOKIE), Some("tok"));
        assert_eq!(cookie(&headers, NAME_COOKIE), Some("ana"));
        assert_eq!(cookie(&headers, "b"), None);
        assert!(valid_name("ana.lopez@ops"));
        assert!(!valid_name("ana; Path=/"));
        assert!(!valid_name(""));
        headers.insert(header::HOST, "127.0.0.1:9443".parse().unwrap());
        assert!(!cross_site(&headers));
        headers.insert(header::ORIGIN, "https://127.0.0.1:9443".parse().unwrap());
        assert!(!cross_site(&headers));
        headers.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(cross_site(&headers));
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"abc", b"ab"));
        assert_eq!(url_encode("a b/é"), "a%20b%2F%C3%A9");
        assert_eq!(unhex(&hex(b"t0k; en=\"x\"")).as_deref(), Some(&b"t0k; en=\"x\""[..]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }
}
