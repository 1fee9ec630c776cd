//! The command line: flags (argh) and, one file per subcommand, what each does and
//! how it prints. `main.rs` only parses, runs and maps errors to exit codes.
//!
//! Flags every client command takes are declared once, in [`client_args!`]:
//! `--state-dir` (by the one rule of [`config::state_dir`]) and `--json`. They are
//! accepted on the leaf subcommand (`outpost jobs show 3 --state-dir X`) and, for
//! the old spelling, on its parent (`outpost files --state-dir X list`).
//!
//! Exit codes: 0 success; 1 a target did not succeed (`send`, `files put`); 2 an
//! error or a usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use argh::FromArgs;

use crate::config;

mod agent;
mod batch;
mod errors;
mod files;
mod jobs;
mod keys;
mod link;
mod nodes;
mod queue;
mod send;
mod status;

/// Declares a client subcommand's flags with the two every client command takes.
macro_rules! client_args {
    ($(#[$meta:meta])* pub struct $name:ident { $($body:tt)* }) => {
        #[derive(::argh::FromArgs, Debug)]
        $(#[$meta])*
        #[argh(help_triggers("-h", "--help"))]
        pub struct $name {
            $($body)*
            /// the local agent's state directory (else OUTPOST_STATE_DIR, else
            /// state_dir in /etc/outpost/outpost.toml, else /var/lib/outpost)
            #[argh(option)]
            pub state_dir: Option<::std::path::PathBuf>,
            /// print JSON, for scripts
            #[argh(switch)]
            pub json: bool,
        }

        impl $name {
            /// The common flags, where a leaf's win over its parent's.
            pub fn common(&self, parent: $crate::cli::Common) -> $crate::cli::Common {
                $crate::cli::Common {
                    state_dir: self.state_dir.clone().or(parent.state_dir),
                    json: self.json || parent.json,
                }
            }
        }
    };
}
pub(crate) use client_args;

/// `--state-dir` and `--json`, merged from where they were given.
#[derive(Debug, Clone, Default)]
pub struct Common {
    pub state_dir: Option<PathBuf>,
    pub json: bool,
}

impl Common {
    /// The state directory by the one rule.
    pub fn dir(&self) -> PathBuf {
        config::state_dir(self.state_dir.clone(), None)
    }

    /// A client of the agent on that state directory.
    pub fn client(&self) -> Result<crate::control::Client, String> {
        crate::control::Client::connect(&self.dir())
    }
}

/// outpost: store-and-forward commands and files for remote Linux nodes over MQTT.
#[derive(FromArgs, Debug)]
#[argh(help_triggers("-h", "--help"))]
pub struct Cli {
    /// print the version
    #[argh(switch, short = 'V')]
    pub version: bool,
    #[argh(subcommand)]
    pub cmd: Option<Cmd>,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
// Parsed once per process; boxing the agent's flags would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Cmd {
    Agent(agent::AgentArgs),
    Send(send::SendArgs),
    Batch(batch::BatchArgs),
    Jobs(jobs::JobsArgs),
    Queue(queue::QueueArgs),
    Status(status::StatusArgs),
    Nodes(nodes::NodesArgs),
    Errors(errors::ErrorsArgs),
    Link(link::LinkArgs),
    Config(ConfigArgs),
    Keys(keys::KeysArgs),
    Files(files::FilesArgs),
    Version(VersionArgs),
    Demo(DemoArgs),
}

/// configuration tools
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "config", help_triggers("-h", "--help"))]
pub struct ConfigArgs {
    #[argh(subcommand)]
    pub cmd: ConfigCmd,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum ConfigCmd {
    Check(ConfigCheck),
}

/// validate a configuration file and print the effective configuration (the
/// file, then OUTPOST_STATE_DIR)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "check", help_triggers("-h", "--help"))]
pub struct ConfigCheck {
    /// configuration file (default /etc/outpost/outpost.toml)
    #[argh(option)]
    pub config: Option<PathBuf>,
    /// JSON output
    #[argh(switch)]
    pub json: bool,
}

/// print the version
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "version", help_triggers("-h", "--help"))]
pub struct VersionArgs {}

/// run a local demo: a broker, a central and two nodes, one behind a flaky link
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "demo", help_triggers("-h", "--help"))]
pub struct DemoArgs {
    /// keep the demo's directory afterwards
    #[argh(switch)]
    pub keep: bool,
}

/// What a parse ended with instead of a command: help to print (exit 0) or a
/// usage error (exit 2).
#[derive(Debug)]
pub enum Early {
    Help(String),
    Usage(String),
}

/// Parses the command line (`args[0]` is the program).
pub fn parse(args: &[String]) -> Result<Cli, Early> {
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (cmd, rest) = strs
        .split_first()
        .map_or(("outpost", &[][..]), |(c, r)| (*c, r));
    let name = std::path::Path::new(cmd)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("outpost");
    match Cli::from_args(&[name], rest) {
        Ok(cli) if cli.cmd.is_none() && !cli.version => Err(Early::Usage(format!(
            "{name}: a subcommand is needed; see `{name} --help`"
        ))),
        Ok(cli) => Ok(cli),
        Err(e) if e.status.is_ok() => Err(Early::Help(e.output)),
        Err(e) => Err(Early::Usage(e.output)),
    }
}

/// Runs what was parsed. The `ExitCode` is the command's own verdict (0, or 1 when
/// a target failed); `Err` is an error, exit 2.
pub fn run(cli: Cli) -> Result<ExitCode, String> {
    let Some(cmd) = cli.cmd else {
        return version();
    };
    if !matches!(cmd, Cmd::Agent(_) | Cmd::Demo(_)) {
        // A client whose output is closed (`outpost jobs | head -1`) just stops,
        // as every Unix tool does; the agent keeps ignoring SIGPIPE.
        // SAFETY: restoring a default disposition before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cmd {
        Cmd::Agent(args) => agent::run(args),
        Cmd::Send(args) => send::run(args),
        Cmd::Batch(args) => batch::run(args),
        Cmd::Jobs(args) => jobs::run(args),
        Cmd::Queue(args) => queue::run(args),
        Cmd::Status(args) => status::run(args),
        Cmd::Nodes(args) => nodes::run(args),
        Cmd::Errors(args) => errors::run(args),
        Cmd::Link(args) => link::run(args),
        Cmd::Config(c) => match c.cmd {
            ConfigCmd::Check(check) => config_check(check),
        },
        Cmd::Keys(k) => keys::run(k),
        Cmd::Files(f) => files::run(f),
        Cmd::Version(_) => version(),
        Cmd::Demo(args) => {
            crate::demo::run(args.keep)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn version() -> Result<ExitCode, String> {
    println!(
        "outpost {} ({})",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    );
    Ok(ExitCode::SUCCESS)
}

fn config_check(check: ConfigCheck) -> Result<ExitCode, String> {
    let (path, explicit) = config_path(check.config);
    let file = config::FileConfig::load(&path, explicit)?.overlay(config::FileConfig::env());
    let cfg = config::Config::build(file)?;
    if check.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&cfg).map_err(|e| e.to_string())?
        );
    } else {
        println!("{}: ok", path.display());
        print!("{}", toml::to_string(&cfg).map_err(|e| e.to_string())?);
    }
    Ok(ExitCode::SUCCESS)
}

/// The configuration file: the flag's (which must exist), else the default (which
/// may be missing).
fn config_path(flag: Option<PathBuf>) -> (PathBuf, bool) {
    match flag {
        Some(p) => (p, true),
        None => (PathBuf::from(config::DEFAULT_CONFIG), false),
    }
}

/// Parses a duration flag such as `--ttl 1h` into whole units.
fn duration_flag(flag: &str, value: Option<&str>) -> Result<Option<std::time::Duration>, String> {
    value
        .map(config::parse_duration)
        .transpose()
        .map_err(|e| format!("{flag}: {e}"))
}
