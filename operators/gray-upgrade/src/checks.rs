//! The optional health checks: an HTTP GET per instance and a Prometheus query per batch.
//! Plain HTTP/1.1 over a TCP stream: the checks need a status code or one number, and this
//! keeps a full HTTP client out of the operator.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the batch's Prometheus query said.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricVerdict {
    /// No query configured, or the batch is not at the point where it matters.
    NotChecked,
    Passed(f64),
    /// Above the threshold: the batch fails.
    Failed(String),
    /// Prometheus could not be asked or gave no number: the batch waits.
    Unknown(String),
}

/// `http://host:port/prefix` into (host:port, prefix).
pub fn split_address(address: &str) -> Result<(String, String), String> {
    let rest = address
        .strip_prefix("http://")
        .ok_or_else(|| format!("{address}: only http:// is supported"))?;
    let (authority, prefix) = match rest.split_once('/') {
        Some((a, p)) => (a, format!("/{}", p.trim_end_matches('/'))),
        None => (rest, String::new()),
    };
    if authority.is_empty() {
        return Err(format!("{address}: no host"));
    }
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((
        authority,
        if prefix == "/" { String::new() } else { prefix },
    ))
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

/// GET `path` from `authority` (host:port); the status code and body.
pub async fn http_get(
    authority: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| format!("connect {authority}: {e}"))?;
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: gantry-gray-upgrade\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("read: {e}"))?;
        parse_response(&String::from_utf8_lossy(&response))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer from {authority} within {timeout:?}"))?
}

/// Status code and body of an HTTP/1.x response (chunked bodies are de-chunked).
pub fn parse_response(text: &str) -> Result<(u16, String), String> {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let code = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "not an HTTP response".to_string())?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// Runs the batch's Prometheus query.
pub async fn prometheus(
    address: &str,
    query: &str,
    max_value: f64,
    timeout: Duration,
) -> MetricVerdict {
    let (authority, prefix) = match split_address(address) {
        Ok(parts) => parts,
        Err(why) => return MetricVerdict::Unknown(why),
    };
    let path = format!("{prefix}/api/v1/query?query={}", encode_query(query));
    let answer = http_get(&authority, &path, timeout)
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

    #[test]
    fn addresses() {
        assert_eq!(
            split_address("http://prom:9090"),
            Ok(("prom:9090".into(), String::new()))
        );
        assert_eq!(
            split_address("http://prom/sub/"),
            Ok(("prom:80".into(), "/sub".into()))
        );
        assert!(split_address("https://prom").is_err());
        assert!(split_address("http://").is_err());
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

    #[test]
    fn responses() {
        assert_eq!(
            parse_response("HTTP/1.1 204 No Content\r\n\r\n"),
            Ok((204, String::new()))
        );
        assert_eq!(
            parse_response(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            ),
            Ok((200, "abcde".into()))
        );
        assert!(parse_response("garbage").is_err());
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
            http_get(&addr.to_string(), "/healthz", Duration::from_secs(2)).await,
            Ok((503, "down".into()))
        );
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let gone = closed.local_addr().expect("addr");
        drop(closed);
        assert!(
            http_get(&gone.to_string(), "/", Duration::from_secs(2))
                .await
                .is_err()
        );
    }
}
