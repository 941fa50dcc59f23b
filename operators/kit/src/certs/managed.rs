//! The operator as its own certificate authority: a CA and a serving certificate in a Secret,
//! rotated by the leader as [`super::rotation`] decides, the CA bundle copied into webhook
//! configurations, and every replica serving what the Secret holds.
//!
//! The Secret (type `kubernetes.io/tls`) holds `tls.crt`/`tls.key` (the serving certificate),
//! `ca.crt` (the bundle clients trust), `ca-signing.crt`/`.key` (the CA that signs now) and,
//! during a CA rotation, `ca-next.crt`/`.key`. Its annotations record the names the serving
//! certificate was issued for and when the bundle as it is was last published.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::json;

use super::der::{self, Validity};
use super::rotation::{self, Observed, Policy, Step};
use super::{CertError, Certificates};
use crate::cache::Cache;
use crate::runtime::Runtime;

/// How long a rotation that cannot progress waits before it looks again (at most).
const STALLED_RETRY: Duration = Duration::from_secs(30);
const TLS_CRT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const BUNDLE: &str = "ca.crt";
const SIGNING_CRT: &str = "ca-signing.crt";
const SIGNING_KEY: &str = "ca-signing.key";
const NEXT_CRT: &str = "ca-next.crt";
const NEXT_KEY: &str = "ca-next.key";
const NAMES_ANNOTATION: &str = "gantry.dev/tls-names";
const PUBLISHED_BUNDLE_ANNOTATION: &str = "gantry.dev/published-bundle";
const PUBLISHED_AT_ANNOTATION: &str = "gantry.dev/published-at";

/// Certificates are valid from a little before they are issued, for clocks that lag.
const BACKDATE: SignedDuration = SignedDuration::from_secs(60);
/// The longest the leader goes without looking at the Secret and the webhook configurations.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// A webhook configuration whose `caBundle` the leader keeps current.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookConfiguration {
    Validating(String),
    Mutating(String),
}

impl WebhookConfiguration {
    /// `validating/NAME` or `mutating/NAME`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once('/') {
            Some(("validating", name)) if !name.is_empty() => Ok(Self::Validating(name.into())),
            Some(("mutating", name)) if !name.is_empty() => Ok(Self::Mutating(name.into())),
            _ => Err(format!("{text:?} is not validating/NAME or mutating/NAME")),
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Settings {
    pub secret: String,
    pub namespace: String,
    pub names: Vec<String>,
    pub webhooks: Vec<WebhookConfiguration>,
    pub policy: Policy,
}

/// Every replica serves what the Secret holds; the leader rotates it.
pub(super) fn start(runtime: &Runtime, settings: Settings, certificates: Certificates) {
    let secrets: Api<Secret> = Api::namespaced(runtime.client().clone(), &settings.namespace);
    let cache = runtime.cache(
        &format!("tls secret {}", settings.secret),
        secrets,
        watcher::Config::default().fields(&format!("metadata.name={}", settings.secret)),
    );
    tokio::spawn(serve_from(
        cache.clone(),
        settings.clone(),
        certificates,
        runtime.clone(),
    ));
    let runtime = runtime.clone();
    tokio::spawn(async move {
        let leader = Arc::new(Leader {
            settings,
            runtime: runtime.clone(),
            cache,
        });
        runtime
            .while_leading("certificate rotation", || Arc::clone(&leader).rotate())
            .await;
    });
}

fn reference(settings: &Settings) -> ObjectRef<Secret> {
    ObjectRef::new(&settings.secret).within(&settings.namespace)
}

/// Loads the serving certificate whenever the Secret's changes.
async fn serve_from(
    cache: Cache<Secret>,
    settings: Settings,
    certificates: Certificates,
    runtime: Runtime,
) {
    let mut changes = Box::pin(cache.changes().subscribe());
    let mut served: Option<(ByteString, ByteString)> = None;
    cache.synced().wait().await;
    loop {
        let pair = cache
            .store()
            .get(&reference(&settings))
            .and_then(|secret| Some((data(&secret, TLS_CRT)?, data(&secret, TLS_KEY)?)));
        if let Some(pair) = pair
            && served.as_ref() != Some(&pair)
        {
            let source = format!("Secret {}", settings.secret);
            certificates.load(&pair.0.0, &pair.1.0, &source, &runtime.metrics().tls);
            served = Some(pair);
        }
        tokio::select! {
            next = changes.next() => if next.is_none() { return },
            () = runtime.shutdown_token().cancelled() => return,
        }
    }
}

fn data(secret: &Secret, key: &str) -> Option<ByteString> {
    secret.data.as_ref()?.get(key).cloned()
}

/// A certificate and its key, as PEM, with its validity.
#[derive(Clone, Debug)]
struct Pair {
    cert: String,
    key: String,
    validity: Validity,
}

impl Pair {
    fn read(secret: &Secret, cert: &str, key: &str) -> Option<Self> {
        let text = |k: &str| String::from_utf8(data(secret, k)?.0).ok();
        let (cert, key) = (text(cert)?, text(key)?);
        let validity = first_validity(&cert)?;
        Some(Self {
            cert,
            key,
            validity,
        })
    }
}

fn first_validity(pem: &str) -> Option<Validity> {
    bundle_validities(pem).into_iter().next().map(|(_, v)| v)
}

/// Each certificate of a PEM bundle, as its own PEM block, with its validity; unreadable
/// ones are left out.
fn bundle_validities(pem: &str) -> Vec<(String, Validity)> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    const END: &str = "-----END CERTIFICATE-----";
    pem.split_inclusive(END)
        .filter_map(|block| {
            let start = block.find("-----BEGIN CERTIFICATE-----")?;
            let block = &block[start..];
            let der = CertificateDer::from_pem_slice(block.as_bytes()).ok()?;
            let validity = der::validity(&der).ok()?;
            Some((format!("{block}\n"), validity))
        })
        .collect()
}

/// What the Secret holds, parsed.
#[derive(Clone, Debug, Default)]
struct Held {
    signing: Option<Pair>,
    next: Option<Pair>,
    bundle: Vec<(String, Validity)>,
    leaf: Option<Pair>,
    names: Vec<String>,
    published: Option<(String, Timestamp)>,
}

impl Held {
    fn read(secret: Option<&Secret>) -> Self {
        let Some(secret) = secret else {
            return Self::default();
        };
        let annotations = secret.annotations();
        let bundle = data(secret, BUNDLE)
            .and_then(|b| String::from_utf8(b.0).ok())
            .map(|pem| bundle_validities(&pem))
            .unwrap_or_default();
        let published = match (
            annotations.get(PUBLISHED_BUNDLE_ANNOTATION),
            annotations
                .get(PUBLISHED_AT_ANNOTATION)
                .and_then(|t| t.parse::<Timestamp>().ok()),
        ) {
            (Some(hash), Some(at)) => Some((hash.clone(), at)),
            _ => None,
        };
        Self {
            signing: Pair::read(secret, SIGNING_CRT, SIGNING_KEY),
            next: Pair::read(secret, NEXT_CRT, NEXT_KEY),
            bundle,
            leaf: Pair::read(secret, TLS_CRT, TLS_KEY),
            names: annotations
                .get(NAMES_ANNOTATION)
                .map(|n| n.split(',').map(str::to_owned).collect())
                .unwrap_or_default(),
            published,
        }
    }

    fn bundle_pem(&self) -> String {
        self.bundle.iter().map(|(pem, _)| pem.as_str()).collect()
    }

    fn observed(&self, names: &[String]) -> Observed {
        let bundle_hash = hash(&self.bundle_pem());
        Observed {
            signing: self.signing.as_ref().map(|p| p.validity),
            pending: self.next.as_ref().map(|p| p.validity),
            bundle: self.bundle.iter().map(|(_, v)| *v).collect(),
            leaf: self.leaf.as_ref().map(|p| p.validity),
            leaf_names_match: self.names == names,
            published_at: self
                .published
                .as_ref()
                .filter(|(published, _)| *published == bundle_hash)
                .map(|(_, at)| *at),
        }
    }
}

fn hash(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn offset(at: Timestamp) -> Result<time::OffsetDateTime, CertError> {
    time::OffsetDateTime::from_unix_timestamp(at.as_second())
        .map_err(|err| CertError::Issue(err.to_string()))
}

fn issue_error(err: rcgen::Error) -> CertError {
    CertError::Issue(err.to_string())
}

/// A CA's subject, derived from when it starts so that the issuer can be rebuilt from the
/// stored certificate without an X.509 parser.
fn ca_subject(secret: &str, not_before: Timestamp) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(
        DnType::CommonName,
        format!("{secret} CA {}", not_before.as_second()),
    );
    name
}

fn ca_params(
    secret: &str,
    not_before: Timestamp,
    not_after: Timestamp,
) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_subject(secret, not_before);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = offset(not_before)?;
    params.not_after = offset(not_after)?;
    Ok(params)
}

fn new_ca(secret: &str, policy: &Policy, now: Timestamp) -> Result<Pair, CertError> {
    let key = KeyPair::generate().map_err(issue_error)?;
    let not_before = now - BACKDATE;
    let not_after =
        now + SignedDuration::try_from(policy.ca_validity).unwrap_or(SignedDuration::MAX);
    let cert = ca_params(secret, not_before, not_after)?
        .self_signed(&key)
        .map_err(issue_error)?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
        validity: Validity {
            not_before: Timestamp::from_second(not_before.as_second()).unwrap_or(not_before),
            not_after: Timestamp::from_second(not_after.as_second()).unwrap_or(not_after),
        },
    })
}

fn san(name: &str) -> Result<SanType, CertError> {
    match name.parse::<IpAddr>() {
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => Ok(SanType::DnsName(name.try_into().map_err(|_| {
            CertError::Issue(format!("{name:?} is not a DNS name"))
        })?)),
    }
}

fn issue_leaf(
    secret: &str,
    signing: &Pair,
    names: &[String],
    policy: &Policy,
    now: Timestamp,
) -> Result<Pair, CertError> {
    let ca_key = KeyPair::from_pem(&signing.key).map_err(issue_error)?;
    let issuer = Issuer::new(
        ca_params(
            secret,
            signing.validity.not_before,
            signing.validity.not_after,
        )?,
        ca_key,
    );
    let key = KeyPair::generate().map_err(issue_error)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let not_before = now - BACKDATE;
    let not_after = rotation::leaf_not_after(policy, &signing.validity, now);
    params.not_before = offset(not_before)?;
    params.not_after = offset(not_after)?;
    let cert = params.signed_by(&key, &issuer).map_err(issue_error)?;
    let validity = first_validity(&cert.pem()).ok_or(CertError::NoCertificate)?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
        validity,
    })
}

/// The Secret's contents for `held`.
fn secret_of(settings: &Settings, held: &Held, resource_version: Option<String>) -> Secret {
    let mut data = BTreeMap::new();
    let mut put = |key: &str, value: &str| {
        data.insert(key.to_string(), ByteString(value.as_bytes().to_vec()));
    };
    if let Some(leaf) = &held.leaf {
        put(TLS_CRT, &leaf.cert);
        put(TLS_KEY, &leaf.key);
    }
    if let Some(signing) = &held.signing {
        put(SIGNING_CRT, &signing.cert);
        put(SIGNING_KEY, &signing.key);
    }
    if let Some(next) = &held.next {
        put(NEXT_CRT, &next.cert);
        put(NEXT_KEY, &next.key);
    }
    put(BUNDLE, &held.bundle_pem());
    let mut annotations = BTreeMap::from([(NAMES_ANNOTATION.to_string(), held.names.join(","))]);
    if let Some((hash, at)) = &held.published {
        annotations.insert(PUBLISHED_BUNDLE_ANNOTATION.to_string(), hash.clone());
        annotations.insert(PUBLISHED_AT_ANNOTATION.to_string(), at.to_string());
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(settings.secret.clone()),
            namespace: Some(settings.namespace.clone()),
            annotations: Some(annotations),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "gantry".to_string(),
            )])),
            resource_version,
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(data),
        ..Secret::default()
    }
}

/// What the leader does to a Secret's contents for one step.
fn apply_step(
    step: Step,
    held: &Held,
    settings: &Settings,
    now: Timestamp,
) -> Result<Held, CertError> {
    let (secret, policy, names) = (&settings.secret, &settings.policy, &settings.names);
    let mut next = held.clone();
    match step {
        Step::Create => {
            let ca = new_ca(secret, policy, now)?;
            next.leaf = Some(issue_leaf(secret, &ca, names, policy, now)?);
            next.bundle = vec![(ca.cert.clone(), ca.validity)];
            next.signing = Some(ca);
            next.next = None;
            next.names = names.clone();
            next.published = None;
        }
        Step::DropExpired => next.bundle.retain(|(_, v)| v.not_after > now),
        Step::AddSuccessor => {
            let ca = new_ca(secret, policy, now)?;
            next.bundle.push((ca.cert.clone(), ca.validity));
            next.next = Some(ca);
        }
        Step::Promote => {
            if let Some(ca) = next.next.take() {
                next.leaf = Some(issue_leaf(secret, &ca, names, policy, now)?);
                next.names = names.clone();
                next.signing = Some(ca);
            }
        }
        Step::RenewLeaf => {
            if let Some(ca) = &next.signing {
                next.leaf = Some(issue_leaf(secret, ca, names, policy, now)?);
                next.names = names.clone();
            }
        }
        Step::Publish => next.published = Some((hash(&held.bundle_pem()), now)),
        Step::Wait { .. } => {}
    }
    Ok(next)
}

/// Why a rotation pass stopped short.
#[derive(Debug, thiserror::Error)]
enum RotateError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
}

struct Leader {
    settings: Settings,
    runtime: Runtime,
    cache: Cache<Secret>,
}

impl Leader {
    /// Rotates until this term ends: look, publish the bundle where it is missing, take the
    /// steps that are due, then wait for the next one (or a change).
    async fn rotate(self: Arc<Self>) {
        let mut changes = Box::pin(self.cache.changes().subscribe());
        loop {
            let wait = match self.pass().await {
                Ok(at) => Duration::try_from(at.duration_since(Timestamp::now()))
                    .unwrap_or(Duration::ZERO)
                    .min(MAX_WAIT),
                Err(err) => {
                    tracing::warn!(secret = %self.settings.secret, error = %err, "certificate rotation failed; retrying");
                    self.runtime.metrics().tls.rotated("Failed");
                    Duration::from_secs(2)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = changes.next() => {}
                () = self.runtime.shutdown_token().cancelled() => return,
            }
        }
    }

    /// One pass; returns when the next step falls due.
    async fn pass(&self) -> Result<Timestamp, RotateError> {
        let secrets: Api<Secret> =
            Api::namespaced(self.runtime.client().clone(), &self.settings.namespace);
        let mut secret = secrets.get_opt(&self.settings.secret).await?;
        let mut taken: Vec<&'static str> = Vec::new();
        loop {
            let held = Held::read(secret.as_ref());
            let bundle = held.bundle_pem();
            let everywhere = !bundle.is_empty() && self.publish(&bundle).await?;
            let now = Timestamp::now();
            let step = rotation::next_step(
                &held.observed(&self.settings.names),
                &self.settings.policy,
                now,
            );
            if step == Step::Publish && !everywhere {
                // Not yet in every webhook configuration: look again shortly.
                return Ok(now + SignedDuration::from_secs(2));
            }
            if let Step::Wait { at } = step {
                return Ok(at);
            }
            let label = step_label(step);
            if taken.contains(&label) {
                // What the step made is already due again (a certificate capped by a CA about
                // to expire, whose successor waits on a webhook configuration): stepping on at
                // once would only rewrite the Secret in a tight loop.
                tracing::warn!(secret = %self.settings.secret, step = label, "certificate rotation cannot progress; is every webhook configuration present?");
                let retry = STALLED_RETRY.min(self.settings.policy.leaf_validity / 4);
                return Ok(now + SignedDuration::try_from(retry).unwrap_or(SignedDuration::ZERO));
            }
            let next = apply_step(step, &held, &self.settings, now)?;
            let rv = secret.as_ref().and_then(|s| s.resource_version());
            let object = secret_of(&self.settings, &next, rv.clone());
            let written = match rv {
                Some(_) => {
                    secrets
                        .replace(&self.settings.secret, &PostParams::default(), &object)
                        .await
                }
                None => secrets.create(&PostParams::default(), &object).await,
            };
            match written {
                Ok(written) => secret = Some(written),
                // Someone else wrote it meanwhile: start over from what is there now.
                Err(kube::Error::Api(status))
                    if status.is_conflict() || status.is_already_exists() =>
                {
                    secret = secrets.get_opt(&self.settings.secret).await?;
                    continue;
                }
                Err(err) => return Err(err.into()),
            }
            taken.push(label);
            tracing::info!(secret = %self.settings.secret, step = label, "certificate rotation");
            self.runtime.metrics().tls.rotated(label);
        }
    }

    /// Puts `bundle` into every configured webhook configuration that lacks it; returns
    /// whether all of them carry it now.
    async fn publish(&self, bundle: &str) -> Result<bool, RotateError> {
        let mut everywhere = true;
        for configuration in &self.settings.webhooks {
            everywhere &= match configuration {
                WebhookConfiguration::Validating(name) => {
                    self.publish_to::<ValidatingWebhookConfiguration>(name, bundle)
                        .await?
                }
                WebhookConfiguration::Mutating(name) => {
                    self.publish_to::<MutatingWebhookConfiguration>(name, bundle)
                        .await?
                }
            };
        }
        Ok(everywhere)
    }

    async fn publish_to<K: Webhooks>(&self, name: &str, bundle: &str) -> Result<bool, RotateError> {
        let api: Api<K> = Api::all(self.runtime.client().clone());
        let webhooks = api.get_opt(name).await?.map(Webhooks::bundles);
        Ok(patch_bundles(&api, name, webhooks, bundle, self.runtime.field_manager()).await?)
    }
}

/// A kind of webhook configuration: its webhooks' names and the CA bundle each trusts.
trait Webhooks:
    kube::Resource<DynamicType = (), Scope = k8s_openapi::ClusterResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
    fn bundles(self) -> Vec<(String, Option<ByteString>)>;
}

macro_rules! webhooks {
    ($($kind:ty),*) => {$(
        impl Webhooks for $kind {
            fn bundles(self) -> Vec<(String, Option<ByteString>)> {
                self.webhooks
                    .unwrap_or_default()
                    .into_iter()
                    .map(|w| (w.name, w.client_config.ca_bundle))
                    .collect()
            }
        }
    )*};
}

webhooks!(ValidatingWebhookConfiguration, MutatingWebhookConfiguration);

/// Sets `caBundle` on every webhook of one configuration whose bundle differs, each guarded by
/// a test of the webhook's name at its index. Returns whether the configuration exists (a
/// missing one cannot be trusted to carry anything).
async fn patch_bundles<K>(
    api: &Api<K>,
    name: &str,
    webhooks: Option<Vec<(String, Option<ByteString>)>>,
    bundle: &str,
    manager: &str,
) -> Result<bool, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(webhooks) = webhooks else {
        tracing::warn!(
            configuration = name,
            "webhook configuration not found; its caBundle cannot be kept current"
        );
        return Ok(false);
    };
    let wanted = ByteString(bundle.as_bytes().to_vec());
    let mut operations = Vec::new();
    for (index, (webhook, current)) in webhooks.iter().enumerate() {
        if current.as_ref() != Some(&wanted) {
            operations.push(
                json!({"op": "test", "path": format!("/webhooks/{index}/name"), "value": webhook}),
            );
            operations.push(json!({"op": "add", "path": format!("/webhooks/{index}/clientConfig/caBundle"), "value": wanted}));
        }
    }
    if operations.is_empty() {
        return Ok(true);
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(operations))
        .map_err(kube::Error::SerdeError)?;
    api.patch(
        name,
        &PatchParams {
            field_manager: Some(manager.to_string()),
            ..PatchParams::default()
        },
        &Patch::<()>::Json(patch),
    )
    .await?;
    tracing::info!(
        configuration = name,
        "updated the webhook configuration's caBundle"
    );
    Ok(true)
}

fn step_label(step: Step) -> &'static str {
    match step {
        Step::Create => "Created",
        Step::DropExpired => "DroppedExpiredCA",
        Step::AddSuccessor => "AddedSuccessorCA",
        Step::Promote => "PromotedCA",
        Step::RenewLeaf => "RenewedCertificate",
        Step::Publish => "PublishedBundle",
        Step::Wait { .. } => "Waited",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::load_pem;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    const POLICY: Policy = Policy {
        ca_validity: Duration::from_secs(3600),
        leaf_validity: Duration::from_secs(600),
        propagation: Duration::from_secs(5),
    };

    fn settings() -> Settings {
        Settings {
            secret: "webhook-tls".into(),
            namespace: "gantry-system".into(),
            names: vec!["hook.gantry-system.svc".into(), "127.0.0.1".into()],
            webhooks: vec![],
            policy: POLICY,
        }
    }

    /// Whether a client trusting `roots` (PEM) accepts `leaf` (PEM) for `name`.
    fn trusted(roots: &str, leaf: &str, name: &str) -> bool {
        let mut store = rustls::RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(roots.as_bytes()) {
            store.add(root.expect("root")).expect("adds");
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(store),
            super::super::provider(),
        )
        .build()
        .expect("verifier");
        let leaf = CertificateDer::from_pem_slice(leaf.as_bytes()).expect("leaf");
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(name.to_string()).expect("name"),
                &[],
                UnixTime::now(),
            )
            .is_ok()
    }

    #[test]
    fn a_leaf_issued_from_a_stored_ca_is_trusted_by_the_bundle_for_each_name() {
        let now = Timestamp::now();
        let created =
            apply_step(Step::Create, &Held::default(), &settings(), now).expect("creates");
        // What the next leader reads back from the Secret.
        let stored = Held::read(Some(&secret_of(&settings(), &created, None)));
        let renewed = apply_step(Step::RenewLeaf, &stored, &settings(), now).expect("renews");
        let leaf = renewed.leaf.as_ref().expect("leaf");
        assert_ne!(leaf.cert, created.leaf.as_ref().expect("leaf").cert);
        for name in ["hook.gantry-system.svc", "127.0.0.1"] {
            assert!(trusted(&stored.bundle_pem(), &leaf.cert, name), "{name}");
        }
        assert!(!trusted(&stored.bundle_pem(), &leaf.cert, "other.svc"));
        assert!(load_pem(leaf.cert.as_bytes(), leaf.key.as_bytes()).is_ok());
    }

    #[test]
    fn a_promoted_successor_signs_and_the_old_ca_stays_trusted() {
        let now = Timestamp::now();
        let created =
            apply_step(Step::Create, &Held::default(), &settings(), now).expect("creates");
        let old_leaf = created.leaf.clone().expect("leaf");
        let added = apply_step(Step::AddSuccessor, &created, &settings(), now).expect("adds");
        assert_eq!(added.bundle.len(), 2);
        let promoted = apply_step(Step::Promote, &added, &settings(), now).expect("promotes");
        let new_leaf = promoted.leaf.as_ref().expect("leaf");
        let bundle = promoted.bundle_pem();
        assert!(
            trusted(&bundle, &new_leaf.cert, "127.0.0.1"),
            "new leaf from the successor"
        );
        assert!(
            trusted(&bundle, &old_leaf.cert, "127.0.0.1"),
            "old leaf still trusted"
        );
        let only_old = created.bundle_pem();
        assert!(
            !trusted(&only_old, &new_leaf.cert, "127.0.0.1"),
            "signed by the successor"
        );
    }

    #[test]
    fn the_published_mark_follows_the_bundle() {
        let now = Timestamp::now();
        let created =
            apply_step(Step::Create, &Held::default(), &settings(), now).expect("creates");
        assert_eq!(created.observed(&settings().names).published_at, None);
        let published = apply_step(Step::Publish, &created, &settings(), now).expect("publishes");
        let stored = Held::read(Some(&secret_of(&settings(), &published, None)));
        assert!(stored.observed(&settings().names).published_at.is_some());
        let added = apply_step(Step::AddSuccessor, &stored, &settings(), now).expect("adds");
        assert_eq!(
            added.observed(&settings().names).published_at,
            None,
            "a new bundle is unpublished"
        );
        assert!(!stored.observed(&["other".into()]).leaf_names_match);
    }

    #[test]
    fn webhook_configurations_are_named_by_kind() {
        assert_eq!(
            WebhookConfiguration::parse("validating/gantry"),
            Ok(WebhookConfiguration::Validating("gantry".into()))
        );
        assert_eq!(
            WebhookConfiguration::parse("mutating/m"),
            Ok(WebhookConfiguration::Mutating("m".into()))
        );
        for bad in ["validating/", "gantry", "conversion/x"] {
            assert!(WebhookConfiguration::parse(bad).is_err(), "{bad}");
        }
    }
}
