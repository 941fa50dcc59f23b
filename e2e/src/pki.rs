//! Certificates for a local cluster and for webhook servers the tests run on the host.
//!
//! Every key is ECDSA P-256; every certificate is signed by a CA made for one cluster (or one
//! test) and written as PEM.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate authority that can issue serving and client certificates.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertKey {
    /// Writes `<stem>.crt` and `<stem>.key` into `dir` (the key readable by the owner only) and
    /// returns their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf)> {
        let crt = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&crt, &self.cert_pem)
            .with_context(|| format!("writing {}", crt.display()))?;
        write_private(&key, &self.key_pem)?;
        Ok((crt, key))
    }
}

impl Ca {
    /// Makes a new self-signed CA whose subject common name is `common_name`.
    pub fn new(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate().context("generating CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let cert = params.self_signed(&key).context("self-signing CA")?;
        Ok(Self {
            cert_pem: cert.pem(),
            params,
            key,
        })
    }

    /// The CA certificate, PEM: what clients trust and what a webhook's `caBundle` holds.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A serving certificate valid for the given DNS names and IP addresses.
    pub fn serving(&self, common_name: &str, dns: &[&str], ips: &[IpAddr]) -> Result<CertKey> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name, None);
        for name in dns {
            params.subject_alt_names.push(SanType::DnsName(
                (*name).try_into().context("DNS name in certificate")?,
            ));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate. Kubernetes reads the user name from the common name and the
    /// group from the organization (one at most: the certificate library keeps one value per
    /// attribute).
    pub fn client(&self, user: &str, group: Option<&str>) -> Result<CertKey> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(user, group);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Result<CertKey> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let key = KeyPair::generate().context("generating key")?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .context("signing certificate")?;
        Ok(CertKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A fresh key pair as (private key PEM (PKCS#8), public key PEM), e.g. for signing
/// service-account tokens.
pub fn key_pair_pem() -> Result<(String, String)> {
    let key = KeyPair::generate().context("generating key")?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn dn(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_pem_certificates() -> Result<()> {
        let ca = Ca::new("test-ca")?;
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let serving = ca.serving("srv", &["localhost"], &["127.0.0.1".parse()?])?;
        assert!(serving.key_pem.contains("PRIVATE KEY"));
        let client = ca.client("alice", Some("team"))?;
        assert_ne!(client.cert_pem, serving.cert_pem);
        Ok(())
    }
}
