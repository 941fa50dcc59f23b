//! The command line every Gantry operator shares.
//!
//! ```text
//! gantry-<operator> [run] [--metrics-addr ADDR] [--health-addr ADDR] [--leader-elect]
//!                   [--lease-name NAME] [--lease-namespace NS] [--identity ID]
//!                   [--log-format json|text] [--log-level FILTER] [--namespace NS]
//! gantry-<operator> crd        # prints the operator's CRDs as YAML
//! ```
//!
//! Every flag can also come from an environment variable (`GANTRY_METRICS_ADDR`, …), which is
//! how the Helm charts set them.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    Json,
    /// Human-readable lines.
    Text,
}

/// Flags of the `run` command.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct RunArgs {
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(long, env = "GANTRY_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Address of the `/healthz` and `/readyz` endpoints (may equal --metrics-addr).
    #[arg(long, env = "GANTRY_HEALTH_ADDR", default_value = "0.0.0.0:8081")]
    pub health_addr: SocketAddr,
    /// Run leader election so that only one of several replicas acts.
    #[arg(long, env = "GANTRY_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the coordination.k8s.io Lease (default: the operator's name).
    #[arg(long, env = "GANTRY_LEASE_NAME")]
    pub lease_name: Option<String>,
    /// Namespace of the Lease (default: POD_NAMESPACE, then the in-cluster service account's
    /// namespace, then gantry-system).
    #[arg(long, env = "GANTRY_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease (default: POD_NAME, then the host name and a
    /// random suffix).
    #[arg(long, env = "GANTRY_IDENTITY")]
    pub identity: Option<String>,
    /// How long a lease stays valid without renewal, in seconds.
    #[arg(long, env = "GANTRY_LEASE_DURATION_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    pub lease_duration_seconds: u64,
    /// Log format.
    #[arg(long, env = "GANTRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter: a level (`info`) or per-module directives (`info,kube=debug`).
    #[arg(long, env = "GANTRY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "GANTRY_NAMESPACE")]
    pub namespace: Option<String>,
    /// The least time between the starts of two reconciles of the same object, in
    /// milliseconds. Changes arriving meanwhile are handled together by the next reconcile:
    /// an object owning thousands of pods is planned a few times a second, not once per pod
    /// change. 0 reconciles on every change.
    #[arg(long, env = "GANTRY_RECONCILE_INTERVAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub reconcile_interval_ms: u64,
    /// How long in-flight reconciles may take to finish after SIGTERM, in seconds.
    #[arg(long, env = "GANTRY_SHUTDOWN_TIMEOUT_SECONDS", default_value_t = 25)]
    pub shutdown_timeout_seconds: u64,
}

impl RunArgs {
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.lease_duration_seconds)
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.reconcile_interval_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_seconds)
    }
}

// Parsed once per process: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator (the default).
    Run(RunArgs),
    /// Print the operator's CustomResourceDefinitions as YAML.
    Crd,
}

#[derive(Parser, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

/// What the command line asked for.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
pub enum Action {
    Run(RunArgs),
    PrintCrds,
}

/// Parses `args` (the first being the program name) for the operator `name`; on a usage error
/// or `--help`, returns clap's error, which knows how to print itself and which exit code to use.
pub fn parse<I, T>(
    name: &'static str,
    about: &'static str,
    version: &'static str,
    args: I,
) -> Result<Action, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let command = Cli::command()
        .name(name)
        .bin_name(name)
        .about(about)
        .version(version);
    let matches = command.try_get_matches_from(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    Ok(match cli.command {
        Some(Command::Run(run)) => Action::Run(run),
        Some(Command::Crd) => Action::PrintCrds,
        None => Action::Run(cli.run),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(args: &[&str]) -> Action {
        parse("gantry-test", "test", "0", args.iter().copied()).expect("parses")
    }

    #[test]
    fn run_is_the_default_with_defaults() {
        let Action::Run(args) = parse_ok(&["gantry-test"]) else {
            panic!("expected run");
        };
        assert_eq!(args.metrics_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(args.health_addr.to_string(), "0.0.0.0:8081");
        assert!(!args.leader_elect);
        assert_eq!(args.log_format, LogFormat::Text);
        assert_eq!(args.lease_duration(), Duration::from_secs(15));
        assert_eq!(args.reconcile_interval(), Duration::from_millis(500));
        assert_eq!(args.namespace, None);
    }

    #[test]
    fn flags_work_with_and_without_the_run_word() {
        let flags = [
            "--leader-elect",
            "--lease-name",
            "l",
            "--namespace",
            "team-a",
            "--log-format",
            "json",
            "--metrics-addr",
            "127.0.0.1:9000",
            "--reconcile-interval-ms",
            "0",
        ];
        let bare = parse_ok(&[&["gantry-test"][..], &flags[..]].concat());
        let with_run = parse_ok(&[&["gantry-test", "run"][..], &flags[..]].concat());
        assert_eq!(bare, with_run);
        let Action::Run(args) = bare else {
            panic!("expected run")
        };
        assert!(args.leader_elect);
        assert_eq!(args.lease_name.as_deref(), Some("l"));
        assert_eq!(args.namespace.as_deref(), Some("team-a"));
        assert_eq!(args.log_format, LogFormat::Json);
        assert_eq!(args.metrics_addr.port(), 9000);
        assert!(args.reconcile_interval().is_zero());
    }

    #[test]
    fn crd_subcommand() {
        assert_eq!(parse_ok(&["gantry-test", "crd"]), Action::PrintCrds);
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let err = parse(
            "gantry-test",
            "t",
            "0",
            ["gantry-test", "--metrics-addr", "nowhere"],
        )
        .expect_err("rejects");
        assert!(err.to_string().contains("--metrics-addr"), "{err}");
        let err = parse(
            "gantry-test",
            "t",
            "0",
            ["gantry-test", "--log-format", "xml"],
        )
        .expect_err("rejects");
        assert!(err.to_string().contains("xml"), "{err}");
        let err = parse(
            "gantry-test",
            "t",
            "0",
            ["gantry-test", "--lease-duration-seconds", "1"],
        )
        .expect_err("rejects");
        assert!(err.to_string().contains("lease-duration-seconds"), "{err}");
        let err = parse(
            "gantry-test",
            "t",
            "0",
            ["gantry-test", "--reconcile-interval-ms", "90000"],
        )
        .expect_err("rejects");
        assert!(err.to_string().contains("reconcile-interval-ms"), "{err}");
    }

    #[test]
    fn help_names_the_operator() {
        let err = parse(
            "gantry-test",
            "Tests things.",
            "0",
            ["gantry-test", "--help"],
        )
        .expect_err("help is an early exit");
        assert!(err.to_string().contains("Tests things."), "{err}");
    }
}
