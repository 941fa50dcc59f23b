//! Logging: JSON lines for production, readable text for people, one level filter for both.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::cli::LogFormat;
use crate::error::KitError;

/// Installs the global subscriber. `level` is a filter such as `info` or
/// `info,gantry_kit=debug`; the `RUST_LOG` variable, when set, takes precedence.
pub fn init(format: LogFormat, level: &str) -> Result<(), KitError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.is_empty() => EnvFilter::try_new(&from_env),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|err| KitError::LogLevel {
        level: level.to_string(),
        reason: err.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::NONE);
    // A second init (tests start several runtimes in one process) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Ok(())
}
