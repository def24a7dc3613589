//! The operations endpoints of sidecar processes as a scraper sees them: `[http]` turned on
//! in every region's config, HTTPS GETs trusting only the mesh CA, series read from a scrape.
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::sidecars::Sidecars;

pub const TOKEN: &str = "s3cret-scrape-token";
/// The console's token, another than the scrape token.
pub const CONSOLE_TOKEN: &str = "console-token; with \"bytes\" a cookie cannot hold";

/// Turns the endpoints on in every region's config; returns where each listens.
pub fn enable_http(sidecars: &Sidecars) -> Vec<u16> {
    enable_http_with(sidecars, "")
}

/// `enable_http`, with `extra` lines in the `[http]` section.
pub fn enable_http_with(sidecars: &Sidecars, extra: &str) -> Vec<u16> {
    let dir = &sidecars.mesh.dir;
    std::fs::write(dir.join("metrics.token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(dir.join("console.token"), format!("{CONSOLE_TOKEN}\n")).unwrap();
    let ports = weft::harness::loopback::free_ports(sidecars.mesh.regions.len()).unwrap();
    for (region, port) in sidecars.mesh.regions.iter().zip(&ports) {
        let mut config = std::fs::read_to_string(&region.config_file).unwrap();
        config += &format!(
            "\n[http]\nlisten = \"127.0.0.1:{port}\"\nready_max_lag_secs = 10\ntoken_file = \"metrics.token\"\n{extra}"
        );
        std::fs::write(&region.config_file, config).unwrap();
    }
    ports
}

/// One HTTPS GET, trusting only the mesh CA and expecting `node`'s certificate.
pub async fn get(dir: &Path, port: u16, node: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("certs/ca.pem")).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(node.to_owned()).unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {node}\r\n{auth}Connection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    let _ = tls.read_to_string(&mut response).await;
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the series `name` whose labels include every one of `labels` (`k="v"`).
pub fn value(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| labels.iter().all(|l| line.contains(l)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
