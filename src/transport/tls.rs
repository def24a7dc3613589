//! Mutual TLS for every link (rustls with the ring provider; no OpenSSL), with each node's
//! identity bound to its certificate.
//!
//! - Certificates: a mesh CA signs one certificate per node whose DNS name (SAN) is the
//!   node id. [`mint`] makes them (`weft certs`); an existing PKI works as well.
//! - Server ([`ServerTls`], [`incoming`]): the TLS handshake is weft's own, so that it
//!   can require a client certificate signed by the CA, log every refused handshake with its
//!   reason and the peer's address (once a minute per address and reason), reload the
//!   files without a restart, and hand the verified chain to the handlers ([`PeerInfo`]).
//!   A handler admits a Hello only from the node its certificate names ([`check_peer`]).
//!   A handshake holds one of the listener's
//!   handshake places (`limits`) for at most two seconds, and a connection takes one of its
//!   established places only once its handshake is done.
//! - Client ([`client_tls`]): tonic's rustls client with the CA, this node's certificate,
//!   and the peer's id as the name its certificate must carry. The files are read at each
//!   dial, so a redial after a rotation uses the new ones.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tonic::Status;

use super::limits::{Gate, Permit};

/// How long a TLS handshake may take before the connection is dropped. A peer's takes a
/// round trip or two and milliseconds of work; a silent client holds a handshake place
/// (`limits`) no longer than this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}; make one with `weft certs --topology FILE --out DIR`")]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("minting certificates: {0}")]
    Mint(String),
}

/// The PEM files of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |reason: String| TlsError::Read {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(e.to_string()))?;
    match certs.is_empty() {
        true => Err(TlsError::Empty {
            what,
            path: path.to_owned(),
        }),
        false => Ok(certs),
    }
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        what: "the private key",
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn server_config(paths: &Paths) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs("the CA bundle", &paths.ca)? {
        roots
            .add(ca)
            .map_err(|e| TlsError::Config(format!("{}: {e}", paths.ca.display())))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs("the certificate", &paths.cert)?, read_key(&paths.key)?)
        .map_err(|e| TlsError::Config(format!("{} with {}: {e}", paths.cert.display(), paths.key.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// TLS for the operations endpoints (`http`): the node's own certificate, no client
/// certificate asked for (a scraper or a browser has none; `/metrics` takes a token
/// instead), HTTP/1.1.
pub fn http_server_config(paths: &Paths) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(read_certs("the certificate", &paths.cert)?, read_key(&paths.key)?)
        .map_err(|e| TlsError::Config(format!("{} with {}: {e}", paths.cert.display(), paths.key.display())))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn stamp(paths: &Paths) -> Vec<Option<SystemTime>> {
    [&paths.ca, &paths.cert, &paths.key]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// The server side's TLS configuration, reloadable.
pub struct ServerTls {
    paths: Paths,
    config: RwLock<(Vec<Option<SystemTime>>, Arc<rustls::ServerConfig>)>,
}

impl ServerTls {
    pub fn load(paths: Paths) -> Result<Self, TlsError> {
        let config = server_config(&paths)?;
        Ok(Self {
            config: RwLock::new((stamp(&paths), config)),
            paths,
        })
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.config.read().expect("tls config lock").1.clone()
    }

    /// Reads the files again if they changed since the last load (`force`: even if not).
    /// A set that does not load is refused: the running one stays.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let now = stamp(&self.paths);
        if !force && self.config.read().expect("tls config lock").0 == now {
            return Ok(false);
        }
        let config = server_config(&self.paths)?;
        *self.config.write().expect("tls config lock") = (now, config);
        Ok(true)
    }
}

/// What a handler knows of a TLS connection: the peer's address and its verified chain.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub chain: Arc<Vec<CertificateDer<'static>>>,
}

/// One accepted connection (`S`: TLS, or plain TCP with `insecure = true`), holding its
/// place in the listener's [`Gate`] until it ends.
pub struct Conn<S> {
    stream: S,
    info: PeerInfo,
    _permit: Permit,
}

impl<S> tonic::transport::server::Connected for Conn<S> {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The TLS connections accepted on `listener`, each handshake on its own task (a slow or
/// silent client holds up no one) and only within the `gate`'s limits; a refused handshake
/// is logged with its reason and the peer's address, once a minute per address and reason.
/// Ends when the receiver is dropped.
pub fn incoming(listener: TcpListener, tls: Arc<ServerTls>, gate: Arc<Gate>) -> Incoming<TlsStream<TcpStream>> {
    accept(listener, gate.clone(), move |tcp, addr| {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let gate = gate.clone();
        async move {
            let refused = |reason: &str, kind: &str| {
                if gate.log_refusal(addr.ip(), kind, Instant::now()) {
                    tracing::warn!(
                        peer = %addr,
                        %reason,
                        "refused a TLS connection from {addr}: {reason} (logged once a minute per address and reason)"
                    );
                }
            };
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                // Closed before a word: a port probe (a health check), not a refusal.
                Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                    tracing::debug!(peer = %addr, "a connection closed before its TLS handshake");
                    return None;
                }
                Ok(Err(error)) => {
                    let reason = why_refused(&error);
                    // The detail in brackets (dates, names) does not make another kind.
                    refused(&reason, reason.split(" (").next().unwrap_or_default());
                    return None;
                }
                Err(_) => {
                    refused(
                        &format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
                        "handshake timeout",
                    );
                    return None;
                }
            };
            let chain = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(<[_]>::to_vec)
                .unwrap_or_default();
            Some((stream, chain))
        }
    })
}

/// The plain-text connections accepted on `listener` (`insecure = true`), within the
/// `gate`'s limits.
pub fn incoming_plain(listener: TcpListener, gate: Arc<Gate>) -> Incoming<TcpStream> {
    accept(listener, gate, |tcp, _| async move { Some((tcp, Vec::new())) })
}

pub type Incoming<S> = tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn<S>>>;

/// Accepts on `listener`: a connection the `gate` has no handshake place for is closed at
/// once; the others go through `handshake` on a task each, which ends early if the gate
/// gives their place to a newcomer, and take an established place once it is done (the gate
/// logs every refusal).
fn accept<S, H, F>(listener: TcpListener, gate: Arc<Gate>, handshake: H) -> Incoming<S>
where
    S: Send + 'static,
    H: Fn(TcpStream, SocketAddr) -> F + Send + 'static,
    F: std::future::Future<Output = Option<(S, Vec<CertificateDer<'static>>)>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(place) = gate.arrive(addr.ip(), Instant::now()) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let shaken = handshake(tcp, addr);
            let tx = tx.clone();
            tokio::spawn(async move {
                let shaken = tokio::select! {
                    shaken = shaken => shaken,
                    () = place.cut() => None,
                };
                let Some((stream, chain)) = shaken else { return };
                let Ok(permit) = place.establish(Instant::now()) else {
                    return;
                };
                let info = PeerInfo {
                    addr,
                    chain: Arc::new(chain),
                };
                let _ = tx
                    .send(Ok(Conn {
                        stream,
                        info,
                        _permit: permit,
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Why a handshake failed, in the words an operator needs.
fn why_refused(error: &std::io::Error) -> String {
    use rustls::CertificateError as C;
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return error.to_string();
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "it sent no client certificate".into(),
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            format!("its certificate has expired ({tls})")
        }
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            format!("its certificate is not valid yet ({tls})")
        }
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            format!("its certificate is not signed by this mesh's CA ({tls})")
        }
        other => other.to_string(),
    }
}

/// Admits a request that claims to come from `node`: over TLS its certificate must name
/// that node. Plain text (`insecure`) admits any claim.
pub fn check_peer(extensions: &tonic::Extensions, node: &str, insecure: bool) -> Result<(), Status> {
    if insecure {
        return Ok(());
    }
    let Some(info) = extensions.get::<PeerInfo>() else {
        return Err(Status::unauthenticated("no TLS peer certificate on this connection"));
    };
    let refuse = |why: String| Status::permission_denied(format!("{} claims to be {node}: {why}", info.addr));
    let leaf = info
        .chain
        .first()
        .ok_or_else(|| refuse("it sent no certificate".into()))?;
    let cert =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| refuse(format!("its certificate does not parse: {e}")))?;
    let name = ServerName::try_from(node.to_owned()).map_err(|e| refuse(format!("not a DNS name: {e}")))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| refuse(format!("its certificate is not for {node}")))
}

/// The client side of a dial to `peer`: the CA, this node's certificate, and the name the
/// peer's certificate must carry (its node id).
pub fn client_tls(paths: &Paths, peer: &str) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
    let read = |what: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::Read {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })
    };
    let ca = read("the CA bundle", &paths.ca)?;
    let cert = read("the certificate", &paths.cert)?;
    let key = read("the private key", &paths.key)?;
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .identity(tonic::transport::Identity::from_pem(cert, key))
        .domain_name(peer.to_owned())
        .assume_http2(true))
}

/// The endpoint to dial `peer` at `address` with: `https` and mutual TLS, or plain `http`
/// with `insecure = true`.
pub fn endpoint(
    security: &crate::config::Security,
    peer: &str,
    address: &str,
) -> Result<tonic::transport::Endpoint, String> {
    use crate::config::Security;
    let plain = |scheme: &str| {
        tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| format!("address {address}: {}", chain(&e)))
    };
    match security {
        Security::Tls { ca, cert, key } => {
            let paths = Paths {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            };
            let tls = client_tls(&paths, peer).map_err(|e| e.to_string())?;
            plain("https")?.tls_config(tls).map_err(|e| chain(&e))
        }
        Security::Insecure => plain("http"),
        Security::Unset => Err("this node's config has no [tls] section".into()),
    }
}

/// An error with its causes, `a: b: c` (tonic's and rustls's errors keep the reason in
/// their sources).
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = cause.source();
    }
    text
}

/// What `mint` makes.
#[derive(Debug, Clone)]
pub struct MintOptions {
    /// The nodes to make certificates for.
    pub nodes: Vec<String>,
    /// Valid from (default: now) for this many days.
    pub not_before: Option<time::OffsetDateTime>,
    pub days: u32,
    /// The mesh name, in the CA's name.
    pub mesh: String,
}

/// Makes (or reuses, if `dir` has one) the mesh CA, and a certificate and key per node of
/// `options.nodes`, in `dir`: `ca.pem`, `ca.key`, `<node>.pem`, `<node>.key` (keys readable
/// by their owner only). Returns the files written.
pub fn mint(dir: &Path, options: &MintOptions) -> Result<Vec<PathBuf>, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let mint = |e: &dyn std::fmt::Display| TlsError::Mint(e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| mint(&e))?;
    let from = options.not_before.unwrap_or_else(time::OffsetDateTime::now_utc);
    let until = from + time::Duration::days(i64::from(options.days));
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let mut written = Vec::new();
    let issuer = if ca_pem.exists() && ca_key.exists() {
        let key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key).map_err(|e| mint(&e))?).map_err(|e| mint(&e))?;
        let pem = std::fs::read_to_string(&ca_pem).map_err(|e| mint(&e))?;
        Issuer::from_ca_cert_pem(&pem, key).map_err(|e| mint(&format!("{}: {e}", ca_pem.display())))?
    } else {
        let key = KeyPair::generate().map_err(|e| mint(&e))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| mint(&e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("weft mesh {} CA", options.mesh));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = from;
        params.not_after = from + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(|e| mint(&e))?;
        write(&ca_pem, cert.pem().as_bytes(), false)?;
        write(&ca_key, key.serialize_pem().as_bytes(), true)?;
        written.extend([ca_pem.clone(), ca_key.clone()]);
        Issuer::new(params, key)
    };
    for node in &options.nodes {
        let key = KeyPair::generate().map_err(|e| mint(&e))?;
        let mut params = CertificateParams::new(vec![node.clone()]).map_err(|e| mint(&format!("node {node}: {e}")))?;
        params.distinguished_name.push(DnType::CommonName, node.clone());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = from;
        params.not_after = until;
        let cert = params.signed_by(&key, &issuer).map_err(|e| mint(&e))?;
        let (pem, key_file) = (dir.join(format!("{node}.pem")), dir.join(format!("{node}.key")));
        write(&pem, cert.pem().as_bytes(), false)?;
        write(&key_file, key.serialize_pem().as_bytes(), true)?;
        written.extend([pem, key_file]);
    }
    Ok(written)
}

fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    let failed = |e: std::io::Error| TlsError::Mint(format!("writing {}: {e}", path.display()));
    std::fs::write(path, bytes).map_err(failed)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}
