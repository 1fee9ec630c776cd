//! Command-line flags (argh): raw values only, no I/O.

use std::path::PathBuf;

use argh::FromArgs;

use crate::config::FileConfig;

/// outpost: store-and-forward commands and files for remote Linux nodes over MQTT.
#[derive(FromArgs, Debug)]
pub struct Cli {
    #[argh(subcommand)]
    pub cmd: Cmd,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
// Parsed once per process; boxing the agent's flags would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Cmd {
    Agent(AgentArgs),
    Send(SendArgs),
    Jobs(JobsArgs),
    Status(StatusArgs),
    Config(ConfigArgs),
    Keys(KeysArgs),
    Files(FilesArgs),
    Version(VersionArgs),
    Demo(DemoArgs),
}

/// run the agent: keep the broker link, store, execute and replay
#[derive(FromArgs, Debug, Default)]
#[argh(subcommand, name = "agent")]
pub struct AgentArgs {
    /// configuration file (default /etc/outpost/outpost.toml)
    #[argh(option)]
    pub config: Option<PathBuf>,
    /// this node's name: a-z 0-9 . _ -
    #[argh(option)]
    pub name: Option<String>,
    /// broker url, mqtt://host:port or mqtts://host:port
    #[argh(option)]
    pub broker: Option<String>,
    /// state directory: store, keys, control socket
    #[argh(option)]
    pub state_dir: Option<PathBuf>,
    /// topic prefix (default outpost)
    #[argh(option)]
    pub prefix: Option<String>,
    /// mqtt keepalive, e.g. 60s
    #[argh(option)]
    pub keepalive: Option<String>,
    /// longest wait between reconnect attempts, e.g. 60s
    #[argh(option)]
    pub backoff_cap: Option<String>,
    /// full (fsync every commit) or normal
    #[argh(option)]
    pub durability: Option<String>,
    /// store quota, e.g. 256MiB
    #[argh(option)]
    pub quota: Option<String>,
    /// error, warn, info or debug (also OUTPOST_LOG)
    #[argh(option)]
    pub log_level: Option<String>,
    /// cap on captured stdout and stderr per command, e.g. 64KiB
    #[argh(option)]
    pub output_cap: Option<String>,
    /// broker user name
    #[argh(option)]
    pub username: Option<String>,
    /// broker password; visible to every user in `ps`: prefer --password-file or
    /// the OUTPOST_PASSWORD environment variable
    #[argh(option)]
    pub password: Option<String>,
    /// file whose first line is the broker password (not readable by others)
    #[argh(option)]
    pub password_file: Option<PathBuf>,
    /// CA certificate file (PEM) for mqtts://
    #[argh(option)]
    pub ca_file: Option<PathBuf>,
    /// client certificate (PEM) for mutual TLS
    #[argh(option)]
    pub client_cert: Option<PathBuf>,
    /// client private key (PEM) for mutual TLS
    #[argh(option)]
    pub client_key: Option<PathBuf>,
    /// where received files land (default STATE_DIR/files)
    #[argh(option)]
    pub files_dir: Option<PathBuf>,
    /// a directory peers may fetch files from (repeatable)
    #[argh(option)]
    pub share_dir: Vec<PathBuf>,
    /// file chunk size (default 16KiB; smaller suits slow links)
    #[argh(option)]
    pub chunk_size: Option<String>,
}

impl AgentArgs {
    /// The flags as a config layer that overrides the file.
    pub fn layer(&self) -> FileConfig {
        FileConfig {
            name: self.name.clone(),
            broker: self.broker.clone(),
            state_dir: self.state_dir.clone(),
            prefix: self.prefix.clone(),
            keepalive: self.keepalive.clone(),
            backoff_cap: self.backoff_cap.clone(),
            durability: self.durability.clone(),
            quota: self.quota.clone(),
            log_level: self.log_level.clone(),
            output_cap: self.output_cap.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            password_file: self.password_file.clone(),
            ca_file: self.ca_file.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
            files_dir: self.files_dir.clone(),
            share_dirs: (!self.share_dir.is_empty()).then(|| self.share_dir.clone()),
            chunk_size: self.chunk_size.clone(),
        }
    }
}

/// send a command to nodes; waits for results unless --async
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "send")]
pub struct SendArgs {
    /// target nodes: comma-separated names and glob patterns (e.g. ship1,wind-*)
    #[argh(option)]
    pub to: String,
    /// ordered (default, one after another) or parallel
    #[argh(option, default = "String::from(\"ordered\")")]
    pub lane: String,
    /// do not start after this long, e.g. 1h
    #[argh(option)]
    pub ttl: Option<String>,
    /// kill the command after this long (default 60s)
    #[argh(option)]
    pub timeout: Option<String>,
    /// print the job id and return at once
    #[argh(switch, long = "async")]
    pub no_wait: bool,
    /// one JSON object per target result
    #[argh(switch)]
    pub json: bool,
    /// the local agent's state directory (else OUTPOST_STATE_DIR, else /var/lib/outpost)
    #[argh(option)]
    pub state_dir: Option<PathBuf>,
    #[argh(subcommand)]
    pub method: Method,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Method {
    Exec(ExecArgs),
    Ping(PingArgs),
    HttpGet(HttpGetArgs),
}

/// run a program: outpost send --to N exec -- PROGRAM ARGS...
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "exec")]
pub struct ExecArgs {
    /// environment variable for the command, NAME=VALUE (repeatable)
    #[argh(option)]
    pub env: Vec<String>,
    /// working directory on the node
    #[argh(option)]
    pub cwd: Option<String>,
    /// run again if the agent was restarted while it ran (default: report interrupted)
    #[argh(switch)]
    pub rerun: bool,
    /// program and arguments
    #[argh(positional, greedy)]
    pub argv: Vec<String>,
}

/// measure the round trip to the nodes
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ping")]
pub struct PingArgs {}

/// fetch a URL from the node's own network
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "http-get")]
pub struct HttpGetArgs {
    /// largest body to return, e.g. 64KiB
    #[argh(option)]
    pub max_body: Option<String>,
    /// the URL
    #[argh(positional)]
    pub url: String,
}

/// list jobs, or show one
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "jobs")]
pub struct JobsArgs {
    /// JSON output
    #[argh(switch)]
    pub json: bool,
    /// the local agent's state directory
    #[argh(option)]
    pub state_dir: Option<PathBuf>,
    #[argh(subcommand)]
    pub show: Option<JobsShow>,
}

/// show one job: outpost jobs show ID [--follow]
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "show")]
pub struct JobsShow {
    /// keep printing results as they arrive until every target has one
    #[argh(switch)]
    pub follow: bool,
    /// JSON output
    #[argh(switch)]
    pub json: bool,
    /// job id
    #[argh(positional)]
    pub id: i64,
}

/// the agent's link, store and queues
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
pub struct StatusArgs {
    /// JSON output
    #[argh(switch)]
    pub json: bool,
    /// the local agent's state directory
    #[argh(option)]
    pub state_dir: Option<PathBuf>,
}

/// configuration tools
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "config")]
pub struct ConfigArgs {
    #[argh(subcommand)]
    pub cmd: ConfigCmd,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum ConfigCmd {
    Check(ConfigCheck),
}

/// validate a configuration file and print the effective configuration
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "check")]
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
#[argh(subcommand, name = "version")]
pub struct VersionArgs {}

/// run a local demo: a broker, a central and two nodes, one behind a flaky link
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "demo")]
pub struct DemoArgs {
    /// keep the demo's directory afterwards
    #[argh(switch)]
    pub keep: bool,
}

/// this node's key pair and the peers it trusts
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "keys")]
pub struct KeysArgs {
    #[argh(subcommand)]
    pub cmd: KeysCmd,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum KeysCmd {
    Gen(KeysGen),
    Show(KeysShow),
    Trust(KeysTrust),
}

/// write a new key pair into the state directory (private key mode 0600)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "gen")]
pub struct KeysGen {
    /// the state directory (else OUTPOST_STATE_DIR, else the configured default)
    #[argh(option)]
    pub state_dir: Option<PathBuf>,
    /// this node's name, recorded for `keys show`
    #[argh(option)]
    pub name: Option<String>,
    /// replace an existing key pair
    #[argh(switch)]
    pub force: bool,
}

/// print `NAME PUBLIC-KEY`, to paste into another node's trust
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "show")]
pub struct KeysShow {
    /// the state directory
    #[argh(option)]
    pub state_dir: Option<PathBuf>,
}

/// trust a peer: outpost keys trust NAME PUBLIC-KEY --allow exec,ping
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "trust")]
pub struct KeysTrust {
    /// the state directory
    #[argh(option)]
    pub state_dir: Option<PathBuf>,
    /// methods the peer may use here: exec, ping, http-get, files (empty: none)
    #[argh(option, default = "String::new()")]
    pub allow: String,
    /// limit exec to these program paths, comma-separated; such an exec runs with a
    /// clean environment, in /, without stdin (see --exec-env, --exec-cwd, --exec-stdin)
    #[argh(option)]
    pub exec_path: Option<String>,
    /// for a path-limited exec: variables the peer may set, comma-separated
    #[argh(option)]
    pub exec_env: Option<String>,
    /// for a path-limited exec: directories it may run in, comma-separated
    #[argh(option)]
    pub exec_cwd: Option<String>,
    /// for a path-limited exec: allow the peer to send stdin
    #[argh(switch)]
    pub exec_stdin: bool,
    /// the peer's name
    #[argh(positional)]
    pub name: String,
    /// the peer's public key (64 hex digits)
    #[argh(positional)]
    pub public_key: String,
}

/// send, fetch and list files
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "files")]
pub struct FilesArgs {
    /// the local agent's state directory
    #[argh(option)]
    pub state_dir: Option<PathBuf>,
    #[argh(subcommand)]
    pub cmd: FilesCmd,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum FilesCmd {
    Put(FilesPut),
    Get(FilesGet),
    List(FilesList),
    Rm(FilesRm),
}

/// send a file to nodes; resumes across link drops and restarts
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "put")]
pub struct FilesPut {
    /// target nodes: comma-separated names and glob patterns
    #[argh(option)]
    pub to: String,
    /// the id it is stored under (default: the file name)
    #[argh(option)]
    pub id: Option<String>,
    /// drop the transfer and the file after this long, e.g. 7d
    #[argh(option)]
    pub ttl: Option<String>,
    /// print the transfer ids and return at once
    #[argh(switch, long = "async")]
    pub no_wait: bool,
    /// JSON output
    #[argh(switch)]
    pub json: bool,
    /// the file to send
    #[argh(positional)]
    pub src: PathBuf,
}

/// fetch a file a node shares
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "get")]
pub struct FilesGet {
    /// the node to fetch from
    #[argh(option)]
    pub from: String,
    /// where to write it (default: only keep it in the files directory)
    #[argh(option, short = 'o')]
    pub output: Option<PathBuf>,
    /// a path in one of the node's share directories
    #[argh(positional)]
    pub path: String,
}

/// files held and transfers in progress
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
pub struct FilesList {
    /// JSON output
    #[argh(switch)]
    pub json: bool,
}

/// delete a received file: outpost files rm ID (or SOURCE/ID)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "rm")]
pub struct FilesRm {
    /// the file id
    #[argh(positional)]
    pub id: String,
}
