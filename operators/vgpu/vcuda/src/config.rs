//! The limits file: format version 1, parsing and validation (pure, no I/O besides `load`).
//!
//! ```json
//! {
//!   "version": 1,
//!   "accountFile": "/var/run/gantry-vcuda/account",
//!   "devices": [
//!     { "uuid": "GPU-6a1f9c2e-0b1d-4c55-9e3a-2f7d8c9b0a11",
//!       "memoryBytes": 8589934592, "computePercent": 50, "mode": "hard" },
//!     { "index": 1, "computePercent": 30, "mode": "soft" }
//!   ]
//! }
//! ```
//!
//! Unknown fields are rejected: a library that cannot understand a limit must not pretend to
//! enforce it.

use serde::Deserialize;
use std::fmt;

/// The only format version this library understands.
pub const FORMAT_VERSION: u32 = 1;
/// Where the device plugin mounts the file inside the container.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/gantry-vcuda/config.json";
/// Environment override of the config path (for tests and debugging only).
pub const CONFIG_ENV: &str = "GANTRY_VCUDA_CONFIG";
/// Where the shared account lives when the file does not say.
pub const DEFAULT_ACCOUNT_FILE: &str = "/tmp/.gantry-vcuda-account";
/// The most devices one container may be given limits for (the account file reserves this many).
pub const MAX_DEVICES: usize = 16;
/// Largest accepted size of the config file.
const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// Hard: never exceed the share. Soft: may borrow capacity that nobody else on the GPU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Hard,
    Soft,
}

/// How a limit names its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSelector {
    /// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lowercase hex: stable across processes,
    /// `CUDA_VISIBLE_DEVICES` and device ordering.
    Uuid(String),
    /// CUDA device ordinal (and NVML index) as the process sees it.
    Index(u32),
}

/// The limits of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLimit {
    pub selector: DeviceSelector,
    /// Memory cap in bytes; `None`: no cap.
    pub memory_bytes: Option<u64>,
    /// Compute share, 1..=100; 100 means no throttling.
    pub compute_percent: u32,
    pub mode: Mode,
}

impl DeviceLimit {
    /// True when kernel launches on this device must be throttled.
    pub fn throttled(&self) -> bool {
        self.compute_percent < 100
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub account_file: String,
    pub devices: Vec<DeviceLimit>,
}

impl Config {
    /// True when any memory cap applies.
    pub fn any_memory_cap(&self) -> bool {
        self.devices.iter().any(|d| d.memory_bytes.is_some())
    }
    /// True when any compute share below 100 % applies.
    pub fn any_throttle(&self) -> bool {
        self.devices.iter().any(DeviceLimit::throttled)
    }
    /// True when nothing at all is limited: the library is then a pure pass-through.
    pub fn is_noop(&self) -> bool {
        !self.any_memory_cap() && !self.any_throttle()
    }
    /// Index of the limit entry for a device, looked up by UUID first, then by index.
    pub fn find(&self, uuid: Option<&str>, index: Option<u32>) -> Option<usize> {
        if let Some(u) = uuid {
            let u = normalize_uuid(u);
            if let Some(i) = self
                .devices
                .iter()
                .position(|d| matches!(&d.selector, DeviceSelector::Uuid(x) if *x == u))
            {
                return Some(i);
            }
        }
        let idx = index?;
        self.devices
            .iter()
            .position(|d| d.selector == DeviceSelector::Index(idx))
    }
}

/// Why a configuration was rejected. The library then denies GPU access (fails closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    version: u32,
    #[serde(default)]
    account_file: Option<String>,
    #[serde(default)]
    devices: Vec<RawDevice>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDevice {
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    memory_bytes: Option<u64>,
    #[serde(default)]
    compute_percent: Option<u32>,
    #[serde(default)]
    mode: Option<Mode>,
}

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// True for `GPU-` followed by the 8-4-4-4-12 hex form NVML prints.
pub fn valid_uuid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("GPU-") else {
        return false;
    };
    let groups: Vec<&str> = rest.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    groups.len() == lens.len()
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `GPU-` followed by the lowercased rest, so that UUIDs compare regardless of case.
pub fn normalize_uuid(s: &str) -> String {
    match s.get(..4) {
        Some(p) if p.eq_ignore_ascii_case("GPU-") => format!("GPU-{}", s[4..].to_ascii_lowercase()),
        _ => s.to_ascii_lowercase(),
    }
}

/// Formats a 16-byte CUDA UUID the way NVML does (`GPU-` + 8-4-4-4-12 lowercase hex).
pub fn format_uuid(bytes: &[u8; 16]) -> String {
    let mut s = String::with_capacity(40);
    s.push_str("GPU-");
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parses and validates the text of a config file.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = serde_json::from_str(text).map_err(|e| err(format!("not valid: {e}")))?;
    if raw.version != FORMAT_VERSION {
        return Err(err(format!(
            "unsupported version {} (this library understands version {FORMAT_VERSION})",
            raw.version
        )));
    }
    let account_file = match raw.account_file {
        None => DEFAULT_ACCOUNT_FILE.to_string(),
        Some(p) if p.starts_with('/') && !p.contains('\0') && p.len() < 4096 => p,
        Some(p) => return Err(err(format!("accountFile {p:?} must be an absolute path"))),
    };
    if raw.devices.len() > MAX_DEVICES {
        return Err(err(format!(
            "{} devices listed, at most {MAX_DEVICES} are supported",
            raw.devices.len()
        )));
    }
    let mut devices: Vec<DeviceLimit> = Vec::with_capacity(raw.devices.len());
    for (i, d) in raw.devices.into_iter().enumerate() {
        let selector = match (d.uuid, d.index) {
            (Some(u), None) => {
                if !valid_uuid(&u) {
                    return Err(err(format!(
                        "devices[{i}].uuid {u:?} is not of the form GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
                    )));
                }
                DeviceSelector::Uuid(normalize_uuid(&u))
            }
            (None, Some(idx)) => DeviceSelector::Index(idx),
            _ => {
                return Err(err(format!(
                    "devices[{i}] must name its device by exactly one of uuid or index"
                )));
            }
        };
        if devices.iter().any(|o| o.selector == selector) {
            return Err(err(format!("devices[{i}] names the same device twice")));
        }
        if d.memory_bytes == Some(0) {
            return Err(err(format!(
                "devices[{i}].memoryBytes must be positive (leave it out for no cap)"
            )));
        }
        let compute_percent = d.compute_percent.unwrap_or(100);
        if !(1..=100).contains(&compute_percent) {
            return Err(err(format!(
                "devices[{i}].computePercent {compute_percent} is outside 1..=100"
            )));
        }
        devices.push(DeviceLimit {
            selector,
            memory_bytes: d.memory_bytes,
            compute_percent,
            mode: d.mode.unwrap_or_default(),
        });
    }
    Ok(Config {
        account_file,
        devices,
    })
}

/// Outcome of looking for the config file.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// No file at the default path: no limits, pure pass-through.
    Absent,
    Valid(Config),
    /// The file exists (or was named explicitly) but is unusable: deny GPU access.
    Invalid {
        path: String,
        error: ConfigError,
    },
}

/// Reads the configuration: `GANTRY_VCUDA_CONFIG` if set (then it must exist), otherwise the
/// default path (absent file: no limits).
pub fn load(env_path: Option<String>) -> Loaded {
    let explicit = env_path.is_some();
    let path = env_path.unwrap_or_else(|| DEFAULT_CONFIG_PATH.to_string());
    let invalid = |error: ConfigError| Loaded::Invalid {
        path: path.clone(),
        error,
    };
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Loaded::Absent,
        Err(e) => return invalid(err(format!("cannot read: {e}"))),
    };
    if meta.len() > MAX_CONFIG_BYTES {
        return invalid(err(format!("larger than {MAX_CONFIG_BYTES} bytes")));
    }
    match std::fs::read_to_string(&path) {
        Ok(text) => match parse(&text) {
            Ok(c) => Loaded::Valid(c),
            Err(e) => invalid(e),
        },
        Err(e) => invalid(err(format!("cannot read: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const U: &str = "GPU-6a1f9c2e-0b1d-4c55-9e3a-2f7d8c9b0a11";

    #[test]
    fn full_example_parses() {
        let c = parse(&format!(
            r#"{{"version":1,"accountFile":"/run/a","devices":[
              {{"uuid":"{U}","memoryBytes":1024,"computePercent":50,"mode":"hard"}},
              {{"index":1,"computePercent":30,"mode":"soft"}}]}}"#
        ))
        .expect("valid");
        assert_eq!(c.account_file, "/run/a");
        assert_eq!(c.devices.len(), 2);
        assert_eq!(c.devices[0].selector, DeviceSelector::Uuid(U.into()));
        assert_eq!(c.devices[0].memory_bytes, Some(1024));
        assert_eq!(c.devices[1].memory_bytes, None);
        assert_eq!(c.devices[1].mode, Mode::Soft);
        assert!(c.any_memory_cap() && c.any_throttle() && !c.is_noop());
        assert_eq!(c.find(Some(U), Some(7)), Some(0));
        assert_eq!(c.find(Some(&U.to_uppercase()), None), Some(0));
        assert_eq!(c.find(Some("GPU-x"), Some(1)), Some(1));
        assert_eq!(c.find(None, Some(2)), None);
    }

    #[test]
    fn defaults() {
        let c = parse(r#"{"version":1,"devices":[{"index":0}]}"#).expect("valid");
        assert_eq!(c.account_file, DEFAULT_ACCOUNT_FILE);
        assert_eq!(c.devices[0].compute_percent, 100);
        assert_eq!(c.devices[0].mode, Mode::Hard);
        assert!(c.is_noop());
        assert!(parse(r#"{"version":1}"#).expect("valid").is_noop());
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        let cases = [
            ("", "not valid"),
            ("{", "not valid"),
            (r#"{"version":2}"#, "unsupported version 2"),
            (r#"{"devices":[]}"#, "missing field `version`"),
            (r#"{"version":1,"extra":1}"#, "unknown field `extra`"),
            (
                r#"{"version":1,"devices":[{"index":0,"memoryMB":1}]}"#,
                "unknown field `memoryMB`",
            ),
            (
                r#"{"version":1,"devices":[{}]}"#,
                "exactly one of uuid or index",
            ),
            (
                r#"{"version":1,"devices":[{"index":0,"uuid":"GPU-0"}]}"#,
                "exactly one of",
            ),
            (
                r#"{"version":1,"devices":[{"uuid":"GPU-0"}]}"#,
                "is not of the form",
            ),
            (
                r#"{"version":1,"devices":[{"index":0},{"index":0}]}"#,
                "same device twice",
            ),
            (
                r#"{"version":1,"devices":[{"index":0,"memoryBytes":0}]}"#,
                "must be positive",
            ),
            (
                r#"{"version":1,"devices":[{"index":0,"memoryBytes":-5}]}"#,
                "not valid",
            ),
            (
                r#"{"version":1,"devices":[{"index":0,"computePercent":0}]}"#,
                "outside 1..=100",
            ),
            (
                r#"{"version":1,"devices":[{"index":0,"computePercent":101}]}"#,
                "outside 1..=100",
            ),
            (
                r#"{"version":1,"devices":[{"index":0,"mode":"medium"}]}"#,
                "unknown variant",
            ),
            (r#"{"version":1,"accountFile":"rel/path"}"#, "absolute path"),
        ];
        for (text, want) in cases {
            let e = parse(text).expect_err(text);
            assert!(e.0.contains(want), "{text}: got {e}, want {want}");
        }
        let many: Vec<String> = (0..17).map(|i| format!(r#"{{"index":{i}}}"#)).collect();
        let e = parse(&format!(
            r#"{{"version":1,"devices":[{}]}}"#,
            many.join(",")
        ))
        .expect_err("too many");
        assert!(e.0.contains("at most 16"));
    }

    #[test]
    fn uuid_formatting_matches_nvml() {
        let b = [
            0x6a, 0x1f, 0x9c, 0x2e, 0x0b, 0x1d, 0x4c, 0x55, 0x9e, 0x3a, 0x2f, 0x7d, 0x8c, 0x9b,
            0x0a, 0x11,
        ];
        assert_eq!(format_uuid(&b), U);
        assert!(valid_uuid(U));
        assert!(!valid_uuid("GPU-6a1f9c2e-0b1d-4c55-9e3a-2f7d8c9b0a1"));
        assert!(!valid_uuid("MIG-6a1f9c2e-0b1d-4c55-9e3a-2f7d8c9b0a11"));
        assert!(!valid_uuid("GPU-6a1f9c2e-0b1d-4c55-9e3a-2f7d8c9b0a1g"));
    }

    #[test]
    fn load_absent_explicit_and_invalid() {
        let dir = std::env::temp_dir().join(format!("vcuda-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let missing = dir.join("missing.json").to_string_lossy().into_owned();
        assert!(matches!(load(Some(missing)), Loaded::Invalid { .. }));
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{\"version\":1,").expect("write");
        match load(Some(bad.to_string_lossy().into_owned())) {
            Loaded::Invalid { error, .. } => assert!(error.0.contains("not valid")),
            other => panic!("unexpected {other:?}"),
        }
        let good = dir.join("good.json");
        std::fs::write(
            &good,
            r#"{"version":1,"devices":[{"index":0,"memoryBytes":5}]}"#,
        )
        .expect("write");
        assert!(matches!(
            load(Some(good.to_string_lossy().into_owned())),
            Loaded::Valid(_)
        ));
        std::fs::remove_dir_all(&dir).ok();
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = parse(&s);
        }

        #[test]
        fn valid_devices_round_trip(mem in proptest::option::of(1u64..u64::MAX),
                                    pct in 1u32..=100, soft: bool, idx in 0u32..64) {
            let mut fields = vec![format!("\"index\":{idx}"), format!("\"computePercent\":{pct}")];
            if let Some(m) = mem { fields.push(format!("\"memoryBytes\":{m}")); }
            fields.push(format!("\"mode\":\"{}\"", if soft { "soft" } else { "hard" }));
            let c = parse(&format!(r#"{{"version":1,"devices":[{{{}}}]}}"#, fields.join(",")))
                .expect("valid");
            prop_assert_eq!(c.devices[0].memory_bytes, mem);
            prop_assert_eq!(c.devices[0].compute_percent, pct);
            prop_assert_eq!(c.devices[0].mode, if soft { Mode::Soft } else { Mode::Hard });
            prop_assert_eq!(c.find(None, Some(idx)), Some(0));
        }
    }
}
