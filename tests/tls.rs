//! Mutual TLS between real `weft run` processes (issue 14), with certificates minted by
//! `weft certs`: the mesh replicates over TLS; clients without a certificate, with one from
//! another CA, with an expired one, or with a valid one for another node are refused, with
//! the reason and the peer in the sidecar's log; a peer whose certificate names another
//! node is not trusted as the expected one; connections that never start their handshake,
//! from many addresses, do not keep the mesh out.
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::sidecars::Sidecars;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use weft::wire::proto;

fn weft_certs(topology: &Path, out: &Path, extra: &[&str]) {
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("certs")
        .arg("--topology")
        .arg(topology)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
}

/// A client presenting `identity` (none: no certificate), trusting `ca`, expecting the
/// server to be `server_name`, asks east's sidecar for an audit tree claiming to be `claim`.
async fn ask(
    s: &Sidecars,
    ca: &Path,
    identity: Option<(PathBuf, PathBuf)>,
    server_name: &str,
    claim: &str,
) -> Result<(), String> {
    let mut client = client(s, ca, identity, server_name).await?;
    client
        .audit(audit_request(s, claim))
        .await
        .map(drop)
        .map_err(|status| format!("{status:?}"))
}

/// A client of east's sidecar over one connection (see [`ask`]).
async fn client(
    s: &Sidecars,
    ca: &Path,
    identity: Option<(PathBuf, PathBuf)>,
    server_name: &str,
) -> Result<proto::replication_client::ReplicationClient<tonic::transport::Channel>, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name(server_name.to_owned())
        .assume_http2(true);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    let address = s.mesh.topology.nodes[0].address.clone();
    let channel = Endpoint::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| weft::transport::tls::chain(&e))?;
    Ok(proto::replication_client::ReplicationClient::new(channel))
}

/// An audit request for the root of `items`' tree, claiming to come from `claim`.
fn audit_request(s: &Sidecars, claim: &str) -> proto::AuditRequest {
    proto::AuditRequest {
        hello: Some(proto::Hello {
            protocol: weft::wire::PROTOCOL,
            node_id: claim.to_owned(),
            region: String::new(),
            mesh: s.mesh.topology.mesh.clone(),
            knows_of_you: 0,
        }),
        audit: "tls-test".into(),
        table: "items".into(),
        ask: Some(proto::audit_request::Ask::Tree(proto::AuditTreeAsk {
            level: 0,
            nodes: vec![0],
        })),
        columns: Vec::new(),
    }
}

fn east_log(s: &Sidecars) -> String {
    std::fs::read_to_string(s.mesh.dir.join("east.log")).unwrap_or_default()
}

async fn wait_log(s: &Sidecars, needle: &str) -> String {
    for _ in 0..50 {
        let log = east_log(s);
        if log.contains(needle) {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("east's log never said {needle:?}:\n{}", east_log(s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_mesh_replicates_and_refuses_every_client_without_the_right_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sidecars::new(dir.path()).await;
    s.spawn_all().await;
    s.write(0, 0, 50, 10).await;
    s.write(1, 0, 50, 10).await;
    s.assert_exactly_once(100).await;
    let certs = dir.path().join("certs");
    let ca = certs.join("ca.pem");
    let own = |node: &str| Some((certs.join(format!("{node}.pem")), certs.join(format!("{node}.key"))));

    // A node of the mesh with its own certificate is admitted.
    ask(&s, &ca, own("west-1"), "east-1", "west-1").await.unwrap();

    // No certificate at all.
    let refused = ask(&s, &ca, None, "east-1", "west-1").await;
    assert!(refused.is_err(), "a client without a certificate was admitted");
    wait_log(&s, "it sent no client certificate").await;

    // A certificate from another CA (another mesh's `weft certs`).
    let other = dir.path().join("other-ca");
    weft_certs(&s.mesh.topology_file, &other, &["--node", "west-1"]);
    let refused = ask(
        &s,
        &ca,
        Some((other.join("west-1.pem"), other.join("west-1.key"))),
        "east-1",
        "west-1",
    )
    .await;
    assert!(refused.is_err(), "a certificate of another CA was admitted");
    wait_log(&s, "not signed by this mesh's CA").await;

    // An expired certificate from the mesh's own CA.
    let expired = dir.path().join("expired");
    std::fs::create_dir_all(&expired).unwrap();
    for file in ["ca.pem", "ca.key"] {
        std::fs::copy(certs.join(file), expired.join(file)).unwrap();
    }
    weft_certs(
        &s.mesh.topology_file,
        &expired,
        &["--node", "west-1", "--not-before", "2020-01-01", "--days", "1"],
    );
    let refused = ask(
        &s,
        &ca,
        Some((expired.join("west-1.pem"), expired.join("west-1.key"))),
        "east-1",
        "west-1",
    )
    .await;
    assert!(refused.is_err(), "an expired certificate was admitted");
    wait_log(&s, "its certificate has expired").await;

    // A valid certificate of south, claiming to be west.
    let refused = ask(&s, &ca, own("south-1"), "east-1", "west-1").await.unwrap_err();
    assert!(
        refused.contains("PermissionDenied") && refused.contains("not for west-1"),
        "{refused}"
    );
    // The refusing node says so too: who was claimed, from where, and why.
    let log = wait_log(&s, "its certificate is not for west-1").await;
    let line = log
        .lines()
        .find(|l| l.contains("its certificate is not for west-1"))
        .unwrap();
    assert!(
        line.contains("refused") && line.contains("west-1") && line.contains("127.0.0.1") && line.contains("audit"),
        "{line}"
    );
    // The same for a replication stream whose Hello claims west.
    let mut impostor = client(&s, &ca, own("south-1"), "east-1").await.unwrap();
    let hello = proto::SendFrame {
        body: Some(proto::send_frame::Body::Hello(proto::Hello {
            protocol: weft::wire::PROTOCOL,
            node_id: "west-1".into(),
            region: "west".into(),
            mesh: s.mesh.topology.mesh.clone(),
            knows_of_you: 0,
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(hello).await.unwrap();
    let opened = impostor
        .replicate(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let refused = match opened {
        Ok(mut replies) => replies.get_mut().message().await.map(drop).unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let log = wait_log(&s, "replicate").await;
    assert!(
        log.lines()
            .any(|l| l.contains("refused") && l.contains("replicate") && l.contains("not for west-1")),
        "{log}"
    );

    // East's certificate does not name west: a client that expects west there refuses it.
    let refused = ask(&s, &ca, own("south-1"), "west-1", "south-1").await.unwrap_err();
    assert!(refused.to_lowercase().contains("not valid for name"), "{refused}");

    // And a plain-text client gets nothing.
    let address = s.mesh.topology.nodes[0].address.clone();
    let plain = Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut client = proto::replication_client::ReplicationClient::new(channel);
        let result = client.audit(proto::AuditRequest::default()).await;
        assert!(result.is_err(), "a plain-text request was answered");
    }
    assert!(s.is_running(0), "east keeps serving");
    s.write(2, 0, 10, 10).await;
    s.assert_exactly_once(110).await;
    s.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_tls_settings_refuses_to_start_and_insecure_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sidecars::new(dir.path()).await;
    let config = &s.mesh.regions[0].config_file;
    let text = std::fs::read_to_string(config).unwrap();
    let without = text[..text.find("\n[tls]").unwrap()].to_owned();
    std::fs::write(config, &without).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["run", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("has no [tls] section") && stderr.contains("weft certs"),
        "{stderr}"
    );

    std::fs::write(config, format!("{without}\n[tls]\ninsecure = true\n")).unwrap();
    s.spawn(0, None).await;
    let log = wait_log(&s, "insecure = true").await;
    assert!(log.contains("neither encrypted nor authenticated"), "{log}");
    s.terminate_all();
}

/// Garbage bytes on the port and a frame larger than `max_message_mib` (here 1 MiB) from an
/// authenticated peer are refused, and the node keeps serving and replicating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_an_oversized_frame_leave_the_node_serving() {
    use tokio::io::AsyncWriteExt as _;
    let dir = tempfile::tempdir().unwrap();
    let replication = weft::config::ReplicationConfig {
        max_message_mib: 1,
        ..Default::default()
    };
    let s = Sidecars::with(
        dir.path(),
        weft::harness::loopback::LoopbackMesh::all_to_all(&["east", "west", "south"]),
        replication,
    )
    .await;
    s.spawn_all().await;
    let address = s.mesh.topology.nodes[0].address.clone();
    for garbage in [
        vec![0u8; 64],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        (0..=255u8).cycle().take(100_000).collect(),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
        let _ = tcp.write_all(&garbage).await;
        drop(tcp);
    }
    wait_log(&s, "refused a TLS connection").await;

    let certs = dir.path().join("certs");
    let ca = certs.join("ca.pem");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&ca).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(certs.join("west-1.pem")).unwrap(),
            std::fs::read(certs.join("west-1.key")).unwrap(),
        ))
        .domain_name("east-1")
        .assume_http2(true);
    let channel = Endpoint::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = proto::replication_client::ReplicationClient::new(channel);
    let huge = proto::AuditRequest {
        table: "x".repeat(2 << 20),
        ..Default::default()
    };
    let refused = client.audit(huge).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");

    let own = Some((certs.join("west-1.pem"), certs.join("west-1.key")));
    ask(&s, &ca, own, "east-1", "west-1").await.unwrap();
    assert!(s.is_running(0));
    s.write(0, 0, 20, 10).await;
    s.write(1, 0, 20, 10).await;
    s.assert_exactly_once(40).await;
    s.terminate_all();
}

/// Handshakes in progress per address and stream opens per address are bounded: a
/// connection over the limit is closed before its handshake, a stream opened too fast is
/// answered RESOURCE_EXHAUSTED with when to retry, and the node keeps serving and
/// replicating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_and_stream_opens_per_address_are_bounded() {
    use tokio::io::AsyncReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let replication = weft::config::ReplicationConfig {
        max_handshakes_per_address: 2,
        opens_per_address_per_sec: 1,
        ..Default::default()
    };
    let topology = weft::harness::loopback::LoopbackMesh::all_to_all(&["east", "west"]);
    let s = Sidecars::with(dir.path(), topology, replication).await;
    s.spawn(0, None).await;
    // The harness's probe of the port gives its place back once east sees it close.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let address = s.mesh.topology.nodes[0].address.clone();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tokio::net::TcpStream::connect(&address).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(&address).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(3), extra.read(&mut [0u8; 16])).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the third connection is closed: {closed:?}"
    );
    let log = wait_log(&s, "turned away").await;
    assert!(
        log.contains("has 2 TLS handshakes in progress, the most one address may"),
        "{log}"
    );
    let mut waiting = held.pop().unwrap();
    let open = tokio::time::timeout(Duration::from_millis(300), waiting.read(&mut [0u8; 16])).await;
    assert!(open.is_err(), "a connection within the limit stays open: {open:?}");
    drop((held, waiting, extra));

    let certs = dir.path().join("certs");
    let own = Some((certs.join("west-1.pem"), certs.join("west-1.key")));
    // The dropped connections give their places back once east sees them close.
    let mut tries = 0;
    let mut client = loop {
        match client(&s, &certs.join("ca.pem"), own.clone(), "east-1").await {
            Ok(client) => break client,
            Err(error) if tries < 30 => {
                tries += 1;
                eprintln!("not yet admitted: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("never admitted again: {error}"),
        }
    };
    let mut codes = Vec::new();
    for _ in 0..6 {
        let code = match client.audit(audit_request(&s, "west-1")).await {
            Ok(_) => tonic::Code::Ok,
            Err(status) => {
                if status.code() == tonic::Code::ResourceExhausted {
                    assert!(status.message().contains("faster than 1/s"), "{status:?}");
                    assert!(status.message().contains("retry in"), "{status:?}");
                }
                status.code()
            }
        };
        codes.push(code);
    }
    assert_eq!(
        codes.iter().filter(|&&c| c == tonic::Code::ResourceExhausted).count(),
        2,
        "a burst of four, then refused: {codes:?}"
    );
    assert!(
        codes[..4].iter().all(|&c| c != tonic::Code::ResourceExhausted),
        "{codes:?}"
    );

    s.spawn(1, None).await;
    s.write(0, 0, 20, 10).await;
    s.write(1, 0, 20, 10).await;
    s.assert_exactly_once(40).await;
    s.terminate_all();
}

/// Silent connections (a TCP connect, then nothing) from eight other loopback addresses, 64
/// each and reopened as east closes them, do not keep the mesh out: west starts during the
/// flood, dials east and replicates, and east says whom it turned away and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_leaves_room_for_the_mesh() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let topology = weft::harness::loopback::LoopbackMesh::all_to_all(&["east", "west"]);
    let s = Sidecars::with(dir.path(), topology, weft::config::ReplicationConfig::default()).await;
    s.spawn(0, None).await;
    let east: std::net::SocketAddr = s.mesh.topology.nodes[0].address.parse().unwrap();
    let opened = std::sync::Arc::new(AtomicUsize::new(0));
    let flood: Vec<_> = (2..=9u8)
        .flat_map(|host| std::iter::repeat_n(std::net::Ipv4Addr::new(127, 0, 0, host), 64))
        .map(|from| tokio::spawn(silent(from, east, opened.clone())))
        .collect();
    let started = std::time::Instant::now();
    while opened.load(Ordering::Relaxed) < 512 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the flood never opened 512 connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The flood's connections would be let go only after east's handshake deadline: a node
    // of the mesh asking now must get in all the same.
    let certs = dir.path().join("certs");
    let own = || Some((certs.join("west-1.pem"), certs.join("west-1.key")));
    let mut refused = Vec::new();
    while let Err(error) = ask(&s, &certs.join("ca.pem"), own(), "east-1", "west-1").await {
        refused.push(error);
        assert!(
            refused.len() < 20,
            "the flood kept a node of the mesh out: {refused:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    s.spawn(1, None).await;
    s.write(1, 0, 20, 10).await;
    s.wait_items(0, 20, "west's rows never reached east during the flood")
        .await;
    s.write(0, 0, 20, 10).await;
    s.wait_items(1, 40, "east's rows never reached west during the flood")
        .await;
    let log = wait_log(&s, "turned away").await;
    assert!(
        log.lines().any(|l| l.contains("turned away") && l.contains("127.0.0.")),
        "{log}"
    );
    for task in flood {
        task.abort();
    }
    s.terminate_all();
}

/// One attacker's connection from `from` to `to`, sending nothing: reopened at once when
/// the server drops it after holding it a while, a second later when it was closed at once.
async fn silent(
    from: std::net::Ipv4Addr,
    to: std::net::SocketAddr,
    opened: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::AsyncReadExt as _;
    loop {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((from, 0).into()).unwrap();
        let Ok(mut tcp) = socket.connect(to).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let held = std::time::Instant::now();
        let _ = tcp.read(&mut [0u8; 1]).await;
        if held.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
