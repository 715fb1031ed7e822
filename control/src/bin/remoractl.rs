//! remoractl: the CLI platform teams use to manage Remora. It validates
//! config offline (`check`), adds the sidecar to Kubernetes workloads
//! offline (`inject`), and drives the control plane's Admin gRPC service
//! (apply, diff, get, delete, history, rollback, status).
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[path = "../cli/mod.rs"]
mod cli;

use cli::commands::{self, Ctx, Format};
use cli::{failure, inject, Failure, Kind};

const EXIT_CODES: &str = "\
Exit codes:
  0  success (for `diff`: no changes)
  1  invalid input, or the server rejected the request (its message names
     the resource and field); for `diff`: there are changes
  2  usage error, unreadable file, or credentials refused (for `diff`:
     also invalid input)
  3  control plane unreachable, or another server error
  4  status --wait: a connected proxy rejected (NACKed) the current
     version, or some had not ACKed it when the wait ended (they are
     listed)";

#[derive(Parser)]
#[command(
    name = "remoractl",
    version,
    about = "Manage a Remora service mesh through its control plane",
    long_about = "Manage a Remora service mesh through its control plane.\n\n\
        Config is written as Kubernetes-style YAML documents (kind: Service or \
        HTTPRoute). `apply` upserts resources into the control plane's running \
        config, which validates the whole config and commits it as a new \
        version; every version is kept and can be rolled back to.",
    after_help = EXIT_CODES
)]
struct Cli {
    /// The control plane's gRPC address: http://host:port, or https:// when
    /// it serves TLS (then --ca-file verifies it).
    #[arg(
        long,
        global = true,
        env = "REMORA_SERVER",
        default_value = "http://127.0.0.1:4200",
        value_name = "URL"
    )]
    server: String,

    /// How long to wait for the control plane: to connect, and for each
    /// request ("5s", "500ms", "1m"; a bare number means seconds).
    #[arg(long, global = true, default_value = "5s", value_parser = parse_timeout, value_name = "DURATION")]
    timeout: Duration,

    /// Root certificate(s) (PEM) that verify an https control plane.
    #[arg(long, global = true, env = "REMORA_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,

    /// File holding the admin token (remora-control --admin-token-file).
    #[arg(long, global = true, env = "REMORA_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

/// A config source.
#[derive(Args)]
struct FileArg {
    /// A YAML file, a directory of .yaml/.yml files (read in name order), or
    /// `-` for stdin. Documents are separated by `---`, one resource each.
    #[arg(short = 'f', long = "filename", value_name = "FILE|DIR|-")]
    file: PathBuf,
}

/// Who a change is recorded as in the history.
#[derive(Args)]
struct AuthorArg {
    /// Recorded as the author of the change [default: $USER@$HOSTNAME, or
    /// "remoractl"].
    #[arg(long)]
    author: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Upsert resources into the running config, as a new version.
    ///
    /// Each resource replaces the one with the same kind, namespace and name
    /// (or is added). The control plane validates the resulting config as a
    /// whole: if anything is invalid nothing changes, and the errors name
    /// the resource and field (exit 1). Applying what is already there
    /// changes nothing and creates no version.
    #[command(after_help = EXIT_CODES)]
    Apply {
        #[command(flatten)]
        file: FileArg,
        #[command(flatten)]
        author: AuthorArg,
    },

    /// Show what `apply` would change, without changing anything.
    ///
    /// Prints each resource that would be created (+), updated (~) or
    /// deleted (-) with a line diff of its YAML. Exit 0 when nothing would
    /// change, 1 when something would, 2 for invalid input or usage errors,
    /// 3 when the control plane is unreachable (as `kubectl diff`).
    Diff {
        #[command(flatten)]
        file: FileArg,
        /// Also list resources that would not change.
        #[arg(long)]
        all: bool,
    },

    /// Show resources of the running config.
    ///
    /// Without KIND, every resource; without NAME, every resource of that
    /// kind. Without -n a listing covers every namespace, and a NAME is
    /// looked up in "default". A NAME that does not exist is an error
    /// (exit 1).
    #[command(after_help = EXIT_CODES)]
    Get {
        /// service (services, svc) or httproute (httproutes, route, routes);
        /// case-insensitive.
        #[arg(value_parser = parse_kind)]
        kind: Option<Kind>,
        /// The resource's name (needs KIND).
        #[arg(requires = "kind")]
        name: Option<String>,
        /// Only this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },

    /// Remove a resource from the running config, as a new version.
    ///
    /// Refused (exit 1) when the rest of the config still needs it, e.g. a
    /// Service that an HTTPRoute references.
    #[command(after_help = EXIT_CODES)]
    Delete {
        /// service (services, svc) or httproute (httproutes, route, routes);
        /// case-insensitive.
        #[arg(value_parser = parse_kind)]
        kind: Kind,
        /// The resource's name.
        name: String,
        /// The resource's namespace [default: default].
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[command(flatten)]
        author: AuthorArg,
    },

    /// List config versions: number, time (UTC), author and summary.
    ///
    /// The control plane keeps what its retention allows
    /// (remora-control --history-keep, --history-max-age).
    #[command(after_help = EXIT_CODES)]
    History {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },

    /// Make an earlier version's config current again, as a new version.
    ///
    /// History is never rewritten: rolling back to version 3 commits version
    /// 3's config as the next version. A version that does not exist is an
    /// error (exit 1).
    #[command(after_help = EXIT_CODES)]
    Rollback {
        /// The version whose config to restore (see `remoractl history`).
        version: u64,
        #[command(flatten)]
        author: AuthorArg,
    },

    /// Show the config version and each proxy's state; wait for a push.
    ///
    /// A summary line counts the connected proxies, how many run the
    /// current snapshot version, NACKs and pending ones, and times the
    /// latest push from its commit to each ACK (p50, p99, last ACK). Then,
    /// for every proxy: its node id, the Service it fronts, whether it is
    /// connected, the snapshot version it runs, and its state: ACK (it runs
    /// the current version), NACK (it rejected the current version, with
    /// its reason, and runs the one it had), PENDING (the current version
    /// is on its way) or - (disconnected). INSTANCE is the endpoint it
    /// registered, SINCE when it connected.
    ///
    /// --wait polls until every connected proxy ACKed the current version
    /// (exit 0), and exits 4 naming the laggards as soon as one NACKs it or
    /// when the wait ends: run it after `apply` in a pipeline.
    #[command(after_help = EXIT_CODES)]
    Status {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
        /// Wait for every connected proxy to ACK the current version, at
        /// most this long.
        #[arg(long, value_name = "DURATION", num_args = 0..=1, require_equals = true,
              default_missing_value = "60s", value_parser = parse_timeout)]
        wait: Option<Duration>,
    },

    /// Validate config offline (no server needed).
    ///
    /// Parses and validates the files as one complete config, exactly as
    /// the control plane and proxies would. Exit 0 when valid, 1 when any
    /// resource is invalid (the errors name resource and field), 2 when the
    /// files cannot be read.
    Check {
        #[command(flatten)]
        file: FileArg,
    },

    /// Make a bootstrap token for one identity (offline; outside Kubernetes).
    ///
    /// Prints a new random token on stdout: give it to the workload's proxy
    /// (--bootstrap-token-file). The control plane keeps only its SHA-256
    /// (--bootstrap-tokens): the line is appended to --tokens-file, or
    /// printed on stderr. The token gets a certificate for this identity
    /// only; deleting its line revokes it.
    Token {
        /// NAMESPACE/SERVICEACCOUNT the token is for.
        identity: String,
        /// The control plane's tokens file, to append the line to.
        #[arg(long, value_name = "FILE")]
        tokens_file: Option<PathBuf>,
    },

    /// Add the Remora sidecar to Kubernetes workloads (offline).
    ///
    /// Reads Kubernetes manifests and writes them to stdout with every pod
    /// template (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job,
    /// CronJob, Pod, and the items of a List) given two init containers:
    /// remora-init, which installs the iptables rules that route the pod's
    /// traffic through the proxy, and remora-proxy as a native sidecar
    /// (restartPolicy: Always), with its volumes. Other documents, and pods
    /// already injected, are written back byte for byte, so injecting twice
    /// changes nothing. Use: remoractl inject -f app.yaml | kubectl apply -f -
    ///
    /// Annotations on the pod template (or the workload):
    /// remora.dev/inject: disabled (skip it); remora.dev/service (the
    /// Service name; default: the workload's name, or a Pod's app label);
    /// remora.dev/skip-inbound-ports, remora.dev/skip-outbound-ports
    /// (comma-separated ports or ranges a-b) and
    /// remora.dev/skip-outbound-cidrs (comma-separated IPv4 blocks): traffic
    /// left out of interception.
    ///
    /// What happened to each workload is reported on stderr; pods that
    /// cannot take the sidecar (hostNetwork: true, names or ports taken)
    /// are left unchanged. Exit 0, 1 when the input is not valid YAML, 2
    /// when it cannot be read; nothing is written on failure.
    Inject {
        #[command(flatten)]
        file: FileArg,
        /// The control plane the sidecars connect to.
        #[arg(long, default_value = inject::DEFAULT_CONTROL_PLANE, value_name = "URL")]
        control_plane: String,
        /// The sidecar's image.
        #[arg(long, default_value = inject::DEFAULT_PROXY_IMAGE, value_name = "IMAGE")]
        proxy_image: String,
        /// The image of remora-init (remora-proxy and iptables; its
        /// entrypoint runs `remora-proxy init`).
        #[arg(long, default_value = inject::DEFAULT_INIT_IMAGE, value_name = "IMAGE")]
        init_image: String,
    },
}

fn parse_kind(text: &str) -> Result<Kind, String> {
    Kind::parse(text)
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let d = remora_proto::duration::parse(text)?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ctx = Ctx {
        server: cli.server,
        timeout: cli.timeout,
        ca_file: cli.ca_file,
        token_file: cli.token_file,
    };
    let result = match cli.command {
        Command::Check { file } => commands::check(&file.file),
        Command::Token {
            identity,
            tokens_file,
        } => cli::token::run(&identity, tokens_file.as_deref()),
        Command::Inject {
            file,
            control_plane,
            proxy_image,
            init_image,
        } => inject::run(
            &file.file,
            &inject::Options {
                control_plane,
                proxy_image,
                init_image,
            },
        ),
        command => run_remote(&ctx, command),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// The commands that talk to the control plane.
fn run_remote(ctx: &Ctx, command: Command) -> Result<u8, Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::server(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async {
        match command {
            Command::Apply { file, author } => {
                commands::apply(ctx, &file.file, commands::author(author.author)).await
            }
            Command::Diff { file, all } => {
                // diff's 1 means "there are changes"; its errors exit 2 or 3.
                commands::diff(ctx, &file.file, all).await.map_err(|mut f| {
                    if f.code == failure::EXIT_INVALID {
                        f.code = failure::EXIT_USAGE;
                    }
                    f
                })
            }
            Command::Get {
                kind,
                name,
                namespace,
                output,
            } => commands::get(ctx, kind, name, namespace, output).await,
            Command::Delete {
                kind,
                name,
                namespace,
                author,
            } => {
                commands::delete(ctx, kind, name, namespace, commands::author(author.author)).await
            }
            Command::History { output } => commands::history(ctx, output).await,
            Command::Rollback { version, author } => {
                commands::rollback(ctx, version, commands::author(author.author)).await
            }
            Command::Status { output, wait } => cli::status::run(ctx, output, wait).await,
            Command::Check { .. } | Command::Inject { .. } | Command::Token { .. } => {
                Err(Failure::usage("offline commands do not run remotely"))
            }
        }
    })
}
