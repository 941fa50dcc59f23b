//! The command line every Gantry operator shares, extended by each operator's own flags.
//!
//! ```text
//! gantry-<operator> [run] [kit flags] [the operator's own flags]
//! gantry-<operator> crd        # prints the operator's CRDs as YAML
//! ```
//!
//! The kit's flags ([`KitArgs`]) are the same in every operator. An operator adds its own by
//! deriving [`clap::Args`] on a struct (`--node-name`, `--kubelet-socket`, ...) and naming it in
//! [`crate::runtime::main`]; [`NoArgs`] is for operators without any. Every flag can also come
//! from an environment variable (`GANTRY_METRICS_ADDR`, ...), which is how the Helm charts set
//! them.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, FromArgMatches, ValueEnum};

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    Json,
    /// Human-readable lines.
    Text,
}

/// The flags every operator has.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct KitArgs {
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(long, env = "GANTRY_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Address of the `/healthz` and `/readyz` endpoints (may equal --metrics-addr).
    #[arg(long, env = "GANTRY_HEALTH_ADDR", default_value = "0.0.0.0:8081")]
    pub health_addr: SocketAddr,
    /// Run leader election so that only one of several replicas does the work that must not
    /// run twice (controllers, status writes); services run on every replica regardless.
    #[arg(long, env = "GANTRY_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the coordination.k8s.io Lease (default: the operator's name).
    #[arg(long, env = "GANTRY_LEASE_NAME")]
    pub lease_name: Option<String>,
    /// Namespace of the Lease (default: POD_NAMESPACE, then the in-cluster service account's
    /// namespace, then gantry-system).
    #[arg(long, env = "GANTRY_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease and in its events (default: POD_NAME, then the
    /// host name and a random suffix).
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
    /// milliseconds, for controllers that do not set their own. Changes arriving meanwhile are
    /// handled together by the next reconcile: an object owning thousands of pods is planned a
    /// few times a second, not once per pod change. 0 reconciles on every change.
    #[arg(long, env = "GANTRY_RECONCILE_INTERVAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub reconcile_interval_ms: u64,
    /// How long in-flight work may take to finish after SIGTERM, in seconds.
    #[arg(long, env = "GANTRY_SHUTDOWN_TIMEOUT_SECONDS", default_value_t = 25)]
    pub shutdown_timeout_seconds: u64,
    /// How long services keep answering after SIGTERM while the replica reports unready, in
    /// seconds, so that Services stop routing to it before it stops listening.
    #[arg(long, env = "GANTRY_SHUTDOWN_DELAY_SECONDS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=120))]
    pub shutdown_delay_seconds: u64,
}

impl KitArgs {
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.lease_duration_seconds)
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.reconcile_interval_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_seconds)
    }

    pub fn shutdown_delay(&self) -> Duration {
        Duration::from_secs(self.shutdown_delay_seconds)
    }
}

/// The flags of an operator that has none of its own.
#[derive(Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct NoArgs {}

/// The `run` command: the kit's flags and the operator's.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct RunArgs<A: Args> {
    #[command(flatten)]
    pub kit: KitArgs,
    #[command(flatten)]
    pub operator: A,
}

/// What the command line asked for.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
pub enum Action<A: Args> {
    Run(RunArgs<A>),
    PrintCrds,
}

/// Parses `args` (the first being the program name) for the operator `name`, whose own flags
/// are `A`; on a usage error or `--help`, returns clap's error, which knows how to print itself
/// and which exit code to use.
pub fn parse<A, I, T>(
    name: &'static str,
    about: &'static str,
    version: &'static str,
    args: I,
) -> Result<Action<A>, clap::Error>
where
    A: Args + FromArgMatches,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let run = || {
        RunArgs::<A>::augment_args(clap::Command::new("run"))
            .about("Run the operator (the default).")
    };
    let command = RunArgs::<A>::augment_args(clap::Command::new(name))
        .bin_name(name)
        .about(about)
        .version(version)
        // Either `run` with its flags, or the flags alone, or `crd`; the top level's required
        // flags do not apply to a subcommand.
        .args_conflicts_with_subcommands(true)
        .subcommand_negates_reqs(true)
        .subcommand(run())
        .subcommand(
            clap::Command::new("crd")
                .about("Print the operator's CustomResourceDefinitions as YAML."),
        );
    let matches = command.try_get_matches_from(args)?;
    Ok(match matches.subcommand() {
        Some(("crd", _)) => Action::PrintCrds,
        Some((_, run)) => Action::Run(RunArgs::from_arg_matches(run)?),
        None => Action::Run(RunArgs::from_arg_matches(&matches)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(args: &[&str]) -> Action<NoArgs> {
        parse("gantry-test", "test", "0", args.iter().copied()).expect("parses")
    }

    fn parse_err(args: &[&str]) -> String {
        parse::<NoArgs, _, _>("gantry-test", "t", "0", args.iter().copied())
            .expect_err("rejects")
            .to_string()
    }

    #[test]
    fn run_is_the_default_with_defaults() {
        let Action::Run(RunArgs { kit, .. }) = parse_ok(&["gantry-test"]) else {
            panic!("expected run");
        };
        assert_eq!(kit.metrics_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(kit.health_addr.to_string(), "0.0.0.0:8081");
        assert!(!kit.leader_elect);
        assert_eq!(kit.log_format, LogFormat::Text);
        assert_eq!(kit.lease_duration(), Duration::from_secs(15));
        assert_eq!(kit.reconcile_interval(), Duration::from_millis(500));
        assert!(kit.shutdown_delay().is_zero());
        assert_eq!(kit.namespace, None);
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
        let Action::Run(RunArgs { kit, .. }) = bare else {
            panic!("expected run")
        };
        assert!(kit.leader_elect);
        assert_eq!(kit.lease_name.as_deref(), Some("l"));
        assert_eq!(kit.namespace.as_deref(), Some("team-a"));
        assert_eq!(kit.log_format, LogFormat::Json);
        assert_eq!(kit.metrics_addr.port(), 9000);
        assert!(kit.reconcile_interval().is_zero());
    }

    /// What a node agent adds: a flag, with an environment fallback, beside the kit's own.
    #[derive(Args, Clone, Debug, PartialEq)]
    struct AgentArgs {
        /// The node this replica acts on.
        #[arg(long, env = "GANTRY_TEST_NODE_NAME")]
        node_name: String,
        #[arg(long, default_value_t = 3)]
        depth: u32,
    }

    #[test]
    fn an_operator_adds_its_own_flags() {
        let action: Action<AgentArgs> = parse(
            "gantry-agent",
            "t",
            "0",
            ["gantry-agent", "run", "--node-name", "n1", "--leader-elect"],
        )
        .expect("parses");
        let Action::Run(run) = action else {
            panic!("expected run")
        };
        assert_eq!(run.operator.node_name, "n1");
        assert_eq!(run.operator.depth, 3);
        assert!(run.kit.leader_elect, "the kit's flags stay");

        let missing = parse::<AgentArgs, _, _>("gantry-agent", "t", "0", ["gantry-agent"])
            .expect_err("--node-name is required");
        assert!(missing.to_string().contains("--node-name"), "{missing}");

        let help = parse::<AgentArgs, _, _>("gantry-agent", "t", "0", ["gantry-agent", "--help"])
            .expect_err("help is an early exit")
            .to_string();
        assert!(
            help.contains("--node-name") && help.contains("--metrics-addr"),
            "{help}"
        );
    }

    #[test]
    fn crd_subcommand() {
        assert_eq!(parse_ok(&["gantry-test", "crd"]), Action::PrintCrds);
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let cases = [
            (
                &["gantry-test", "--metrics-addr", "nowhere"][..],
                "--metrics-addr",
            ),
            (&["gantry-test", "--log-format", "xml"], "xml"),
            (
                &["gantry-test", "--lease-duration-seconds", "1"],
                "lease-duration-seconds",
            ),
            (
                &["gantry-test", "--reconcile-interval-ms", "90000"],
                "reconcile-interval-ms",
            ),
            (
                &["gantry-test", "--shutdown-delay-seconds", "500"],
                "shutdown-delay-seconds",
            ),
        ];
        for (args, named) in cases {
            let err = parse_err(args);
            assert!(err.contains(named), "{args:?}: {err}");
        }
    }

    #[test]
    fn help_names_the_operator() {
        let err = parse::<NoArgs, _, _>(
            "gantry-test",
            "Tests things.",
            "0",
            ["gantry-test", "--help"],
        )
        .expect_err("help is an early exit");
        assert!(err.to_string().contains("Tests things."), "{err}");
    }
}
