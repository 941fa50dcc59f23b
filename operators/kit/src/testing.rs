//! Helpers for the kit's own tests.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal HTTP/1.0 GET, to keep an HTTP client out of the dependencies: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .expect("writes");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("reads");
    split_response(&response)
}

/// The status code and body of a raw HTTP/1 response.
pub fn split_response(response: &str) -> (u16, String) {
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (code, body)
}

/// A runtime for unit tests: a client that must never be used (it points at a closed
/// loopback port), a fresh registry and readiness, always leading.
pub fn test_runtime() -> crate::Runtime {
    let config = kube::Config::new("http://127.0.0.1:1".parse().expect("uri"));
    let client = kube::Client::try_from(config).expect("client");
    let info = crate::OperatorInfo {
        name: "gantry-test",
        about: "test",
        version: "0",
        crds: Vec::new,
    };
    crate::Runtime::new(info, client, crate::runtime::RuntimeSettings::default())
}

/// GET `path` over TLS from `addr`, trusting only `root_pem` and expecting the certificate to
/// be valid for 127.0.0.1: status and body, or why the connection failed.
pub async fn https_get(
    addr: SocketAddr,
    path: &str,
    root_pem: &str,
) -> Result<(u16, String), String> {
    https_request(addr, "GET", path, root_pem, &[]).await
}

/// Sends one HTTP/1.0 request over TLS (see [`https_get`]).
pub async fn https_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    root_pem: &str,
    body: &[u8],
) -> Result<(u16, String), String> {
    let mut tls = connect(addr, root_pem).await?;
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(body).await.map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    // A server that closes without a TLS close_notify still sent its answer.
    let _ = tls.read_to_end(&mut response).await;
    if response.is_empty() {
        return Err("no answer".into());
    }
    Ok(split_response(&String::from_utf8_lossy(&response)))
}

/// A self-signed certificate for `names` and its key, as PEM.
pub fn self_signed(names: &[&str]) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(names.iter().map(ToString::to_string).collect::<Vec<_>>())
            .expect("params");
    (
        params.self_signed(&key).expect("signs").pem(),
        key.serialize_pem(),
    )
}

/// A TLS connection to `addr` that trusts only `root_pem` and expects a certificate for
/// 127.0.0.1.
pub async fn connect(
    addr: SocketAddr,
    root_pem: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(crate::certs::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

/// Certificates holding a fresh self-signed certificate for 127.0.0.1, and that certificate
/// (PEM) for clients to trust.
pub fn self_signed_certificates(name: &str) -> (crate::certs::Certificates, String) {
    let certificates = crate::certs::Certificates::empty(name);
    let cert = renew_self_signed(&certificates);
    (certificates, cert)
}

/// Puts a fresh self-signed certificate for 127.0.0.1 into `certificates`; returns it (PEM).
pub fn renew_self_signed(certificates: &crate::certs::Certificates) -> String {
    let (cert, key) = self_signed(&["127.0.0.1"]);
    certificates.set(crate::certs::load_pem(cert.as_bytes(), key.as_bytes()).expect("loads"));
    cert
}

/// Serves `router` as `name` on a loopback port of the runtime's, presenting `certificates`.
pub async fn serve(
    runtime: &crate::Runtime,
    name: &'static str,
    router: axum::Router,
    certificates: crate::certs::Certificates,
    max_connection_age: std::time::Duration,
) -> crate::https::Https {
    runtime
        .serve_https_with(
            name,
            "127.0.0.1:0".parse().expect("addr"),
            router,
            certificates,
            max_connection_age,
        )
        .await
        .expect("listens")
}
