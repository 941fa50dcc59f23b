//! Just enough DER to read an X.509 certificate's validity: when it starts and when it
//! expires, for rotation and for the expiry metric, without an X.509 parser in the build.
//!
//! ```text
//! Certificate ::= SEQUENCE { tbsCertificate TBSCertificate, ... }
//! TBSCertificate ::= SEQUENCE {
//!     version [0] EXPLICIT Version OPTIONAL, serialNumber INTEGER,
//!     signature AlgorithmIdentifier, issuer Name,
//!     validity SEQUENCE { notBefore Time, notAfter Time }, ... }
//! Time ::= UTCTime (YYMMDDHHMMSSZ) | GeneralizedTime (YYYYMMDDHHMMSSZ)
//! ```

use k8s_openapi::jiff::Timestamp;
use k8s_openapi::jiff::civil::DateTime;
use k8s_openapi::jiff::tz::TimeZone;

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: Timestamp,
    pub not_after: Timestamp,
}

/// Why a certificate's validity could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an X.509 certificate: {0}")]
pub struct DerError(&'static str);

/// One tag-length-value: its tag, its contents, and what follows it.
fn next(input: &[u8]) -> Result<(u8, &[u8], &[u8]), DerError> {
    let (&tag, rest) = input.split_first().ok_or(DerError("truncated"))?;
    let (&first, rest) = rest.split_first().ok_or(DerError("truncated length"))?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return Err(DerError("bad length"));
        }
        let length = rest[..count]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (length, &rest[count..])
    };
    if rest.len() < length {
        return Err(DerError("truncated contents"));
    }
    Ok((tag, &rest[..length], &rest[length..]))
}

fn expect<'a>(
    input: &'a [u8],
    tag: u8,
    what: &'static str,
) -> Result<(&'a [u8], &'a [u8]), DerError> {
    let (found, contents, rest) = next(input)?;
    if found != tag {
        return Err(DerError(what));
    }
    Ok((contents, rest))
}

/// The validity of a DER-encoded certificate.
pub fn validity(certificate: &[u8]) -> Result<Validity, DerError> {
    let (cert, _) = expect(certificate, SEQUENCE, "no certificate sequence")?;
    let (tbs, _) = expect(cert, SEQUENCE, "no to-be-signed sequence")?;
    let mut rest = tbs;
    if rest.first() == Some(&VERSION) {
        rest = next(rest)?.2;
    }
    let (_, rest) = expect(rest, INTEGER, "no serial number")?;
    let (_, rest) = expect(rest, SEQUENCE, "no signature algorithm")?;
    let (_, rest) = expect(rest, SEQUENCE, "no issuer")?;
    let (validity, _) = expect(rest, SEQUENCE, "no validity")?;
    let (before_tag, before, rest) = next(validity)?;
    let (after_tag, after, _) = next(rest)?;
    Ok(Validity {
        not_before: time(before_tag, before)?,
        not_after: time(after_tag, after)?,
    })
}

fn digits(text: &[u8], at: usize, count: usize) -> Result<i32, DerError> {
    let slice = text.get(at..at + count).ok_or(DerError("short time"))?;
    slice.iter().try_fold(0i32, |acc, b| {
        if b.is_ascii_digit() {
            Ok(acc * 10 + i32::from(b - b'0'))
        } else {
            Err(DerError("time is not digits"))
        }
    })
}

fn time(tag: u8, text: &[u8]) -> Result<Timestamp, DerError> {
    let (year, at) = match tag {
        // RFC 5280: two-digit years 50-99 are 19xx, 00-49 are 20xx.
        UTC_TIME => {
            let yy = digits(text, 0, 2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        GENERALIZED_TIME => (digits(text, 0, 4)?, 4),
        _ => return Err(DerError("validity is not a time")),
    };
    if text.get(at + 10) != Some(&b'Z') {
        return Err(DerError("time is not in UTC"));
    }
    let field = |offset: usize| -> Result<i8, DerError> {
        i8::try_from(digits(text, at + offset, 2)?).map_err(|_| DerError("time out of range"))
    };
    let year = i16::try_from(year).map_err(|_| DerError("year out of range"))?;
    let civil = DateTime::new(
        year,
        field(0)?,
        field(2)?,
        field(4)?,
        field(6)?,
        field(8)?,
        0,
    )
    .map_err(|_| DerError("not a date"))?;
    civil
        .to_zoned(TimeZone::UTC)
        .map(|zoned| zoned.timestamp())
        .map_err(|_| DerError("not a date"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(not_before: i64, not_after: i64) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(vec!["example.test".to_string()]).expect("params");
        params.not_before =
            time::OffsetDateTime::from_unix_timestamp(not_before).expect("valid time");
        params.not_after =
            time::OffsetDateTime::from_unix_timestamp(not_after).expect("valid time");
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("signs").der().to_vec()
    }

    #[test]
    fn reads_both_ends_of_the_validity() {
        // 2026-12-01T00:00:00Z and 2027-03-01T12:30:45Z (UTCTime); 2051 needs GeneralizedTime.
        for (before, after) in [
            (1_796_083_200, 1_803_990_645),
            (1_796_083_200, 2_556_144_000),
        ] {
            let validity = validity(&issued(before, after)).expect("parses");
            assert_eq!(validity.not_before.as_second(), before);
            assert_eq!(validity.not_after.as_second(), after);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(validity(&[]).is_err());
        assert!(validity(&[0x30, 0x82, 0xff]).is_err());
        let good = issued(1_796_083_200, 1_803_990_645);
        for cut in [1, 10, 40, 100] {
            assert!(validity(&good[..cut]).is_err(), "cut at {cut}");
        }
    }
}
