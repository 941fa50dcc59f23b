//! Serving certificates for the operators' HTTPS services (webhooks, scheduler extenders).
//!
//! Two ways to get one ([`TlsArgs`]):
//! - **files** (`--tls-cert-file`, `--tls-key-file`): written by cert-manager or by hand,
//!   usually a mounted Secret. They are read again whenever they change, on every replica;
//!   a pair that does not load is logged and counted, and the certificate served so far stays.
//! - **managed** (`--tls-secret`): the operator is its own certificate authority. The leader
//!   keeps a CA and a serving certificate in the named Secret, rotates both well before they
//!   expire ([`rotation`]) and keeps the `caBundle` of the named webhook configurations
//!   current; every replica serves what the Secret holds.
//!
//! Either way a new certificate is swapped in for new connections without a restart; open
//! connections keep theirs.

pub mod der;
mod managed;
pub mod rotation;

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use clap::Args;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::runtime::Runtime;
pub use managed::WebhookConfiguration;

/// Where an HTTPS service's certificate comes from; flatten into an operator's own flags.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct TlsArgs {
    /// The serving certificate (PEM, leaf first), read again whenever it changes.
    #[arg(
        long,
        env = "GANTRY_TLS_CERT_FILE",
        requires = "tls_key_file",
        conflicts_with = "tls_secret"
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// The serving certificate's private key (PEM).
    #[arg(long, env = "GANTRY_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Manage the certificate authority and serving certificate in this Secret (in the
    /// operator's namespace) instead of reading files.
    #[arg(long, env = "GANTRY_TLS_SECRET")]
    pub tls_secret: Option<String>,
    /// A name the managed serving certificate is valid for: a DNS name
    /// (`svc.namespace.svc`) or an IP address; repeat for several.
    #[arg(long = "tls-name", env = "GANTRY_TLS_NAMES", value_delimiter = ',')]
    pub tls_names: Vec<String>,
    /// A webhook configuration whose caBundle the leader keeps current, as
    /// `validating/NAME` or `mutating/NAME`; repeat for several.
    #[arg(long = "tls-webhook-configuration", env = "GANTRY_TLS_WEBHOOK_CONFIGURATIONS", value_delimiter = ',', value_parser = WebhookConfiguration::parse)]
    pub tls_webhook_configurations: Vec<WebhookConfiguration>,
    /// How long a managed serving certificate lives (Go duration: 720h, 90s).
    #[arg(long, env = "GANTRY_TLS_VALIDITY", default_value = "720h", value_parser = parse_duration)]
    pub tls_validity: Duration,
    /// How long the managed certificate authority lives.
    #[arg(long, env = "GANTRY_TLS_CA_VALIDITY", default_value = "26280h", value_parser = parse_duration)]
    pub tls_ca_validity: Duration,
    /// How long a new CA must have been in the published bundle before it signs.
    #[arg(long, env = "GANTRY_TLS_PROPAGATION_DELAY", default_value = "60s", value_parser = parse_duration)]
    pub tls_propagation_delay: Duration,
}

/// A Go-style duration (`1h30m`, `90s`, `720h`), as Kubernetes spells them.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let parsed: kube::core::Duration = text
        .parse()
        .map_err(|err| format!("{text:?} is not a duration like 720h or 90s: {err}"))?;
    if parsed.is_negative() {
        return Err(format!("{text:?} must not be negative"));
    }
    Ok(Duration::from(parsed))
}

/// Why a certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("give either --tls-cert-file and --tls-key-file, or --tls-secret")]
    NoSource,
    #[error("--tls-secret needs at least one --tls-name for the serving certificate")]
    NoNames,
    #[error("invalid certificate lifetimes: {0}")]
    Policy(#[from] rotation::PolicyError),
    #[error("could not read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no certificate in the PEM data")]
    NoCertificate,
    #[error("could not parse the PEM data: {0}")]
    Pem(String),
    #[error("the private key is not usable: {0}")]
    Key(String),
    #[error("could not read the certificate's validity: {0}")]
    Validity(#[from] der::DerError),
    #[error("could not issue a certificate: {0}")]
    Issue(String),
}

/// A certificate and key that rustls can serve, with when the certificate expires.
pub struct Loaded {
    key: Arc<CertifiedKey>,
    pub validity: der::Validity,
}

/// Parses a PEM certificate chain and private key into something rustls can serve.
pub fn load_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Loaded, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|err| CertError::Pem(err.to_string()))?;
    let leaf = chain.first().ok_or(CertError::NoCertificate)?;
    let validity = der::validity(leaf)?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|err| CertError::Pem(err.to_string()))?;
    let provider = provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|err| CertError::Key(err.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|err| CertError::Key(format!("it does not belong to the certificate: {err}")))?;
    Ok(Loaded {
        key: Arc::new(certified),
        validity,
    })
}

/// The crypto every HTTPS service of the kit uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate a service presents now. Cheap to clone; clones share it, so a new
/// certificate reaches every listener at once.
#[derive(Clone)]
pub struct Certificates {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    current: RwLock<Option<Arc<CertifiedKey>>>,
    loaded: watch::Sender<Option<der::Validity>>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("name", &self.inner.name)
            .field("validity", &*self.inner.loaded.borrow())
            .finish()
    }
}

impl Certificates {
    /// Serves the pair from `source` if it loads; one that does not leaves the certificate
    /// served so far in place. Either way it is logged and counted.
    pub(crate) fn load(
        &self,
        cert_pem: &[u8],
        key_pem: &[u8],
        source: &str,
        metrics: &crate::metrics::TlsMetrics,
    ) {
        match load_pem(cert_pem, key_pem) {
            Ok(loaded) => {
                tracing::info!(service = self.name(), source, not_after = %loaded.validity.not_after, "serving a new certificate");
                self.set(loaded);
                metrics.reloaded(self.name(), true);
            }
            Err(err) => {
                tracing::warn!(service = self.name(), source, error = %err, "the certificate does not load; keeping the one served so far");
                metrics.reloaded(self.name(), false);
            }
        }
    }

    /// None yet; [`Certificates::set`] provides one.
    pub fn empty(name: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.to_string(),
                current: RwLock::new(None),
                loaded: watch::channel(None).0,
            }),
        }
    }

    /// Serves `loaded` from the next handshake on.
    pub fn set(&self, loaded: Loaded) {
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(loaded.key);
        self.inner.loaded.send_replace(Some(loaded.validity));
    }

    /// The validity of the certificate served now, if any.
    pub fn validity(&self) -> Option<der::Validity> {
        *self.inner.loaded.borrow()
    }

    /// Waits until a certificate is loaded.
    pub async fn loaded(&self) {
        let mut receiver = self.inner.loaded.subscribe();
        // The sender lives in `self`: the channel cannot close while this waits.
        let _ = receiver.wait_for(Option::is_some).await;
    }

    /// Notified whenever another certificate is loaded.
    pub fn subscribe(&self) -> watch::Receiver<Option<der::Validity>> {
        self.inner.loaded.subscribe()
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.inner
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("validity", &self.validity)
            .finish()
    }
}

/// How often certificate files are checked for changes.
const FILE_POLL: Duration = Duration::from_secs(2);

impl Runtime {
    /// The certificates of the HTTPS service `name`, kept current as [`TlsArgs`] says: files
    /// read again when they change, or a managed CA (rotated by the leader) in a Secret.
    pub fn certificates(&self, name: &str, args: &TlsArgs) -> Result<Certificates, CertError> {
        let certificates = Certificates::empty(name);
        match (&args.tls_cert_file, &args.tls_key_file, &args.tls_secret) {
            (Some(cert), Some(key), _) => {
                let files = Files {
                    cert: cert.clone(),
                    key: key.clone(),
                };
                tokio::spawn(files.follow(
                    certificates.clone(),
                    self.metrics().clone(),
                    self.shutdown_token().clone(),
                ));
            }
            (_, _, Some(secret)) => {
                if args.tls_names.is_empty() {
                    return Err(CertError::NoNames);
                }
                let policy = rotation::Policy {
                    ca_validity: args.tls_ca_validity,
                    leaf_validity: args.tls_validity,
                    propagation: args.tls_propagation_delay,
                };
                policy.check()?;
                managed::start(
                    self,
                    managed::Settings {
                        secret: secret.clone(),
                        namespace: crate::runtime::own_namespace(),
                        names: args.tls_names.clone(),
                        webhooks: args.tls_webhook_configurations.clone(),
                        policy,
                    },
                    certificates.clone(),
                );
            }
            _ => return Err(CertError::NoSource),
        }
        let follow =
            crate::metrics::follow_certificates(self.metrics().clone(), certificates.clone());
        let shutdown = self.shutdown_token().clone();
        tokio::spawn(async move {
            tokio::select! {
                () = follow => {}
                () = shutdown.cancelled() => {}
            }
        });
        Ok(certificates)
    }
}

/// A certificate and key in files, read again when either changes.
struct Files {
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn read(&self) -> Result<(Vec<u8>, Vec<u8>), CertError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| CertError::Read {
                path: path.clone(),
                source,
            })
        };
        Ok((read(&self.cert)?, read(&self.key)?))
    }

    async fn follow(
        self,
        certificates: Certificates,
        metrics: crate::metrics::Metrics,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut last: Option<(Vec<u8>, Vec<u8>)> = None;
        loop {
            match self.read() {
                Ok(pair) if last.as_ref() != Some(&pair) => {
                    let source = self.cert.display().to_string();
                    certificates.load(&pair.0, &pair.1, &source, &metrics.tls);
                    last = Some(pair);
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(service = certificates.name(), error = %err, "could not read the serving certificate");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(FILE_POLL) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::self_signed;

    #[test]
    fn a_pem_pair_loads_and_a_mismatched_one_is_refused() {
        let (cert, key) = self_signed(&["a.test"]);
        let loaded = load_pem(cert.as_bytes(), key.as_bytes()).expect("loads");
        assert!(loaded.validity.not_after > k8s_openapi::jiff::Timestamp::now());
        let (_, other_key) = self_signed(&["b.test"]);
        let err = load_pem(cert.as_bytes(), other_key.as_bytes()).expect_err("mismatch");
        assert!(err.to_string().contains("does not belong"), "{err}");
        assert!(matches!(
            load_pem(b"", key.as_bytes()),
            Err(CertError::NoCertificate)
        ));
    }

    #[tokio::test]
    async fn certificate_files_are_read_again_when_they_change_and_a_bad_pair_is_refused() {
        let runtime = crate::testing::test_runtime();
        let dir = std::env::temp_dir().join(format!("gantry-kit-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let write = |names: &[&str]| {
            let (c, k) = self_signed(names);
            std::fs::write(&cert, c).expect("writes");
            std::fs::write(&key, k).expect("writes");
        };
        write(&["first.test"]);
        let args = TlsArgs {
            tls_cert_file: Some(cert.clone()),
            tls_key_file: Some(key.clone()),
            tls_secret: None,
            tls_names: Vec::new(),
            tls_webhook_configurations: Vec::new(),
            tls_validity: Duration::from_secs(3600),
            tls_ca_validity: Duration::from_secs(36_000),
            tls_propagation_delay: Duration::from_secs(1),
        };
        let certificates = runtime.certificates("files", &args).expect("files");
        let mut loaded = certificates.subscribe();
        tokio::time::timeout(Duration::from_secs(10), certificates.loaded())
            .await
            .expect("loads the first pair");
        loaded.borrow_and_update();
        let metric = |outcome: &str| {
            format!(r#"gantry_tls_certificate_loads_total{{server="files",outcome="{outcome}"}}"#)
        };
        // A key that does not match: refused, the first certificate stays.
        let (_, other_key) = self_signed(&["other.test"]);
        std::fs::write(&key, other_key).expect("writes");
        let refused = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let text = runtime.metrics().encode().expect("encodes");
                if text.contains(&format!("{} 1", metric("Rejected"))) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(refused.is_ok(), "the mismatched pair was rejected");
        assert!(
            !loaded.has_changed().expect("open"),
            "the first certificate stays"
        );
        // A good new pair is served.
        write(&["second.test"]);
        tokio::time::timeout(Duration::from_secs(10), loaded.changed())
            .await
            .expect("the new pair is loaded")
            .expect("open");
        let text = runtime.metrics().encode().expect("encodes");
        assert!(text.contains(&format!("{} 2", metric("Loaded"))), "{text}");
        runtime.shutdown_token().cancel();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn durations_read_as_kubernetes_writes_them() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn flags_choose_one_source() {
        use clap::Parser;
        #[derive(Parser, Debug)]
        struct Flags {
            #[command(flatten)]
            tls: TlsArgs,
        }
        let files = Flags::try_parse_from(["x", "--tls-cert-file", "c", "--tls-key-file", "k"])
            .expect("files");
        assert!(files.tls.tls_secret.is_none());
        assert!(
            Flags::try_parse_from(["x", "--tls-cert-file", "c"]).is_err(),
            "a certificate needs its key"
        );
        assert!(
            Flags::try_parse_from([
                "x",
                "--tls-cert-file",
                "c",
                "--tls-key-file",
                "k",
                "--tls-secret",
                "s"
            ])
            .is_err(),
            "one source only"
        );
        let managed = Flags::try_parse_from([
            "x",
            "--tls-secret",
            "s",
            "--tls-name",
            "svc.ns.svc,127.0.0.1",
            "--tls-webhook-configuration",
            "validating/v1",
            "--tls-validity",
            "90s",
        ])
        .expect("managed");
        assert_eq!(managed.tls.tls_names, ["svc.ns.svc", "127.0.0.1"]);
        assert_eq!(managed.tls.tls_validity, Duration::from_secs(90));
        assert!(
            Flags::try_parse_from(["x", "--tls-webhook-configuration", "other/v1"]).is_err(),
            "validating or mutating only"
        );
    }
}
