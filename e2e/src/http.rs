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
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("malformed HTTP response from {addr}: {head:?}"))?;
    Ok((status, body.to_owned()))
}
