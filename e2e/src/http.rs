//! A minimal plain-HTTP client for loopback probes (etcd health, operator metrics and health
//! endpoints). Only `127.0.0.1`/`::1` addresses are accepted.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// GET `path` from `addr` (`127.0.0.1:PORT`) with HTTP/1.0; returns status and body.
pub async fn get(addr: &str, path: &str) -> Result<(u16, String)> {
    let sock: std::net::SocketAddr = addr.parse().with_context(|| format!("address {addr:?}"))?;
    if !sock.ip().is_loopback() {
        bail!("refusing to connect to {addr}: only loopback addresses are probed");
    }
    let exchange = async {
        let mut stream = TcpStream::connect(sock).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out"))??;
    parse_response(addr, &raw)
}

/// The status and body of a raw HTTP/1 response from `from`.
fn parse_response(from: impl std::fmt::Display, raw: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("malformed HTTP response from {from}: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// One HTTP/1.1 request over TLS to `addr` (loopback only), trusting only `ca_pem` and checking
/// the certificate is valid for 127.0.0.1: status and body.
pub async fn https_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    ca_pem: &str,
    body: &[u8],
) -> Result<(u16, String)> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName};
    if !addr.ip().is_loopback() {
        bail!("refusing to connect to {addr}: only loopback addresses are probed");
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("parsing the CA")?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let exchange = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = connector
            .connect(ServerName::try_from("127.0.0.1")?, tcp)
            .await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(body).await?;
        let mut raw = Vec::new();
        // A server that closes without a TLS close_notify still sent its answer.
        let _ = tls.read_to_end(&mut raw).await;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("{method} https://{addr}{path} timed out"))??;
    parse_response(addr, &raw)
}
