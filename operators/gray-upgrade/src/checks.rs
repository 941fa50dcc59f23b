//! The optional health checks: an HTTP GET per instance and a Prometheus query per batch, on
//! hyper's client (the one the Kubernetes client uses too), over rustls.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub use crate::model::MetricVerdict;

/// How a check's connection is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Plain,
    /// TLS, with the server's certificate checked against the system's trusted roots.
    Tls,
    /// TLS without checking the certificate, as the kubelet does for HTTPS probes: instances
    /// mostly serve certificates no public root vouches for.
    TlsUnverified,
}

/// Where a URL points: how to connect, `host:port`, and the path prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub transport: Transport,
    pub authority: String,
    pub prefix: String,
}

/// `http://host:port/prefix` or `https://…` into an [`Endpoint`].
pub fn split_address(address: &str) -> Result<Endpoint, String> {
    let (transport, rest, default_port) = if let Some(rest) = address.strip_prefix("http://") {
        (Transport::Plain, rest, 80)
    } else if let Some(rest) = address.strip_prefix("https://") {
        (Transport::Tls, rest, 443)
    } else {
        return Err(format!(
            "{address}: only http:// and https:// are supported"
        ));
    };
    let (authority, prefix) = match rest.split_once('/') {
        Some((a, p)) => (a, format!("/{}", p.trim_end_matches('/'))),
        None => (rest, String::new()),
    };
    if authority.is_empty() {
        return Err(format!("{address}: no host"));
    }
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        && !authority.ends_with(']');
    let authority = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    Ok(Endpoint {
        transport,
        authority,
        prefix: if prefix == "/" { String::new() } else { prefix },
    })
}

/// `host:port`, with an IPv6 address in brackets.
pub fn authority(host: &str, port: i32) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Percent-encodes a query-string value.
pub fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The query with `$pods` replaced by an anchored alternation of the pod names.
pub fn expand_query(query: &str, pods: &[String]) -> String {
    query.replace("$pods", &pods.join("|"))
}

/// The number in a Prometheus instant-query answer (a one-element vector or a scalar).
pub fn parse_query_value(body: &str) -> Result<f64, String> {
    let json: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    if json["status"] != "success" {
        return Err(format!(
            "query failed: {}",
            json["error"].as_str().unwrap_or("unknown error")
        ));
    }
    let data = &json["data"];
    let value = match data["resultType"].as_str() {
        Some("scalar") => &data["result"][1],
        Some("vector") => match data["result"].as_array().map(Vec::len) {
            Some(1) => &data["result"][0]["value"][1],
            Some(0) => return Err("the query returned no series".into()),
            _ => return Err("the query returned several series; aggregate it to one".into()),
        },
        other => return Err(format!("unexpected result type {other:?}")),
    };
    value
        .as_str()
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| "the answer holds no number".into())
}

/// Judges a value against the threshold.
pub fn judge(value: Result<f64, String>, max_value: f64) -> MetricVerdict {
    match value {
        Ok(v) if v.is_nan() => MetricVerdict::Unknown("the query returned NaN".into()),
        Ok(v) if v > max_value => {
            MetricVerdict::Failed(format!("query value {v} is above {max_value}"))
        }
        Ok(v) => MetricVerdict::Passed(v),
        Err(why) => MetricVerdict::Unknown(why),
    }
}

/// The client for a transport, built once: connections are kept and reused.
type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

fn client(transport: Transport) -> Result<HttpClient, String> {
    static VERIFIED: OnceLock<Result<HttpClient, String>> = OnceLock::new();
    static UNVERIFIED: OnceLock<Result<HttpClient, String>> = OnceLock::new();
    let build = |verify: bool| {
        let config = tls::config(verify)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*config).clone())
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Client::builder(TokioExecutor::new()).build(connector))
    };
    match transport {
        Transport::Tls => VERIFIED.get_or_init(|| build(true)).clone(),
        Transport::Plain | Transport::TlsUnverified => {
            UNVERIFIED.get_or_init(|| build(false)).clone()
        }
    }
}

/// GET `path` from `authority` (host:port) over `transport`; the status code and body.
pub async fn http_get(
    transport: Transport,
    authority: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let scheme = match transport {
        Transport::Plain => "http",
        Transport::Tls | Transport::TlsUnverified => "https",
    };
    let uri: http::Uri = format!("{scheme}://{authority}{path}")
        .parse()
        .map_err(|e| format!("{scheme}://{authority}{path} is not a URL: {e}"))?;
    let request = http::Request::get(uri)
        .header(http::header::USER_AGENT, "gantry-gray-upgrade")
        .body(Empty::new())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let client = client(transport)?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("GET {authority}{path}: {}", error_chain(&e)))?;
        let code = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer from {authority}: {e}"))?
            .to_bytes();
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer from {authority} within {timeout:?}"))?
}

/// An error with its causes, as one line: the client's own message is often only "client
/// error (Connect)".
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

mod tls {
    //! TLS client settings, built once.

    use std::sync::{Arc, OnceLock};

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Settings that check certificates against the system's roots, or that accept any.
    pub fn config(verify: bool) -> Result<Arc<ClientConfig>, String> {
        static VERIFIED: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
        static UNVERIFIED: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
        if verify {
            VERIFIED.get_or_init(verified).clone()
        } else {
            UNVERIFIED.get_or_init(unverified).clone()
        }
    }

    fn verified() -> Result<Arc<ClientConfig>, String> {
        let mut roots = RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err("no trusted root certificates found on this system".into());
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    fn unverified() -> Result<Arc<ClientConfig>, String> {
        let provider = provider();
        let verifier = AnyCertificate(provider.signature_verification_algorithms);
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// Accepts any certificate, while still checking that the server holds its key.
    #[derive(Debug)]
    struct AnyCertificate(WebPkiSupportedAlgorithms);

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_schemes()
        }
    }
}

/// Runs the batch's Prometheus query.
pub async fn prometheus(
    address: &str,
    query: &str,
    max_value: f64,
    timeout: Duration,
) -> MetricVerdict {
    let endpoint = match split_address(address) {
        Ok(endpoint) => endpoint,
        Err(why) => return MetricVerdict::Unknown(why),
    };
    let path = format!(
        "{}/api/v1/query?query={}",
        endpoint.prefix,
        encode_query(query)
    );
    let answer = http_get(endpoint.transport, &endpoint.authority, &path, timeout)
        .await
        .and_then(|(code, body)| {
            if (200..300).contains(&code) {
                parse_query_value(&body)
            } else {
                Err(format!("Prometheus answered {code}"))
            }
        });
    judge(answer, max_value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn addresses() {
        let endpoint = |transport, authority: &str, prefix: &str| {
            Ok(Endpoint {
                transport,
                authority: authority.into(),
                prefix: prefix.into(),
            })
        };
        assert_eq!(
            split_address("http://prom:9090"),
            endpoint(Transport::Plain, "prom:9090", "")
        );
        assert_eq!(
            split_address("http://prom/sub/"),
            endpoint(Transport::Plain, "prom:80", "/sub")
        );
        assert_eq!(
            split_address("https://prom.example"),
            endpoint(Transport::Tls, "prom.example:443", "")
        );
        assert_eq!(
            split_address("https://[fd00::1]/p"),
            endpoint(Transport::Tls, "[fd00::1]:443", "/p")
        );
        assert_eq!(
            split_address("https://[fd00::1]:9443"),
            endpoint(Transport::Tls, "[fd00::1]:9443", "")
        );
        assert!(
            split_address("ftp://prom")
                .expect_err("unsupported")
                .contains("http://")
        );
        assert!(split_address("http://").is_err());
        assert_eq!(authority("10.0.0.1", 80), "10.0.0.1:80");
        assert_eq!(authority("fd00::1", 80), "[fd00::1]:80");
    }

    #[test]
    fn queries_are_encoded_and_expanded() {
        assert_eq!(
            encode_query(r#"a{pod=~"x|y"}"#),
            "a%7Bpod%3D~%22x%7Cy%22%7D"
        );
        assert_eq!(
            expand_query(r#"up{pod=~"$pods"}"#, &["ocr-2".into(), "ocr-5".into()]),
            r#"up{pod=~"ocr-2|ocr-5"}"#
        );
    }

    #[test]
    fn prometheus_answers() {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000,"0.25"]}]}}"#;
        assert_eq!(parse_query_value(vector), Ok(0.25));
        let scalar =
            r#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"3"]}}"#;
        assert_eq!(parse_query_value(scalar), Ok(3.0));
        assert!(
            parse_query_value(r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#)
                .is_err()
        );
        assert!(
            parse_query_value(r#"{"status":"error","error":"bad_data"}"#)
                .expect_err("an error answer")
                .contains("bad_data")
        );
        assert!(parse_query_value("<html>").is_err());
    }

    #[test]
    fn verdicts() {
        assert_eq!(judge(Ok(0.5), 1.0), MetricVerdict::Passed(0.5));
        assert!(matches!(judge(Ok(1.5), 1.0), MetricVerdict::Failed(_)));
        assert!(matches!(
            judge(Ok(f64::NAN), 1.0),
            MetricVerdict::Unknown(_)
        ));
        assert!(matches!(
            judge(Err("down".into()), 1.0),
            MetricVerdict::Unknown(_)
        ));
    }

    #[tokio::test]
    async fn http_get_talks_to_a_real_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\ndown")
                    .await;
            }
        });
        assert_eq!(
            http_get(
                Transport::Plain,
                &addr.to_string(),
                "/healthz",
                Duration::from_secs(2)
            )
            .await,
            Ok((503, "down".into()))
        );
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let gone = closed.local_addr().expect("addr");
        drop(closed);
        assert!(
            http_get(
                Transport::Plain,
                &gone.to_string(),
                "/",
                Duration::from_secs(2)
            )
            .await
            .is_err()
        );
    }

    /// A TLS listener with a self-signed certificate for `localhost` that answers 200 once
    /// per connection.
    async fn tls_listener() -> std::net::SocketAddr {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("self-signed");
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let mut buf = [0u8; 1024];
                        let _ = tls.read(&mut buf).await;
                        let _ = tls
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn https_checks_skip_verification_only_when_told() {
        let addr = tls_listener().await;
        let authority = format!("localhost:{}", addr.port());
        assert_eq!(
            http_get(
                Transport::TlsUnverified,
                &authority,
                "/healthz",
                Duration::from_secs(5)
            )
            .await,
            Ok((200, "ok".into())),
            "an instance's self-signed certificate is accepted"
        );
        let verified = http_get(Transport::Tls, &authority, "/", Duration::from_secs(5)).await;
        let why = verified.expect_err("a self-signed certificate is not trusted");
        assert!(why.contains("TLS") || why.contains("certificate"), "{why}");
        let plain = http_get(Transport::Plain, &authority, "/", Duration::from_secs(5)).await;
        assert!(
            plain.is_err(),
            "plain HTTP to a TLS port gets no HTTP answer"
        );
    }
}
