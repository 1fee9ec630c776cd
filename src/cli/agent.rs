//! `outpost agent`: build the configuration (file, then the environment, then
//! flags), start logging, run the agent.

use std::path::PathBuf;
use std::process::ExitCode;

use argh::FromArgs;

use crate::config::{Config, FileConfig};

/// run the agent: keep the broker link, store, execute and replay
#[derive(FromArgs, Debug, Default)]
#[argh(subcommand, name = "agent", help_triggers("-h", "--help"))]
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
    /// state directory: store, keys, control socket (else OUTPOST_STATE_DIR, else
    /// state_dir in the configuration file, else /var/lib/outpost)
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
    /// custom facts: executables printing KEY=VALUE lines, or files of them
    #[argh(option)]
    pub facts_dir: Option<PathBuf>,
    /// send a full set of facts at least this often (default 24h)
    #[argh(option)]
    pub facts_refresh: Option<String>,
    /// read facts and send what changed this often (default 5m)
    #[argh(option)]
    pub facts_interval: Option<String>,
    /// finished jobs, results and events older than this are pruned (default 30d)
    #[argh(option)]
    pub retention: Option<String>,
    /// at most this many finished jobs (and journal rows, results, events) kept
    /// (default 100000)
    #[argh(option)]
    pub retention_jobs: Option<u64>,
    /// TLS versions offered: 1.2,1.3 (default), 1.2 (smaller reconnects; the
    /// default with --link on-demand) or 1.3
    #[argh(option)]
    pub tls_versions: Option<String>,
    /// a budget of this node's link, e.g. 5MiB/day or 100MiB/month (repeat for
    /// several)
    #[argh(option)]
    pub budget: Vec<String>,
    /// when a class of traffic may use the link, e.g. "bulk 02:00-04:00 UTC"
    /// (repeat for several)
    #[argh(option)]
    pub link_window: Vec<String>,
    /// always (default) or on-demand: connect only to send, to poll, and while
    /// traffic flows
    #[argh(option)]
    pub link: Option<String>,
    /// on-demand: the longest the link stays down between polls (default 30m)
    #[argh(option)]
    pub poll: Option<String>,
    /// on-demand: how long a quiet link stays up before it hangs up (default 30s)
    #[argh(option)]
    pub linger: Option<String>,
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
            compress: None,
            username: self.username.clone(),
            password: self.password.clone(),
            password_file: self.password_file.clone(),
            ca_file: self.ca_file.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
            tls_versions: self.tls_versions.clone(),
            files_dir: self.files_dir.clone(),
            share_dirs: (!self.share_dir.is_empty()).then(|| self.share_dir.clone()),
            chunk_size: self.chunk_size.clone(),
            facts_dir: self.facts_dir.clone(),
            facts_refresh: self.facts_refresh.clone(),
            facts_interval: self.facts_interval.clone(),
            retention: self.retention.clone(),
            retention_jobs: self.retention_jobs,
            budget: (!self.budget.is_empty()).then(|| self.budget.clone()),
            peer_budgets: None,
            link_windows: (!self.link_window.is_empty()).then(|| self.link_window.clone()),
            link: self.link.clone(),
            poll: self.poll.clone(),
            linger: self.linger.clone(),
        }
    }
}

pub(super) fn run(args: AgentArgs) -> Result<ExitCode, String> {
    let (path, explicit) = super::config_path(args.config.clone());
    let mut file = FileConfig::load(&path, explicit)?
        .overlay(FileConfig::env())
        .overlay(args.layer());
    if file.name.is_none() {
        // The name `keys gen --name` recorded, when nothing else gives one.
        let dir = file
            .state_dir
            .clone()
            .unwrap_or_else(|| crate::config::DEFAULT_STATE_DIR.into());
        file.name = super::keys::node_name(&dir);
    }
    let cfg = Config::build(file)?;
    let level = match std::env::var("OUTPOST_LOG") {
        Ok(l) if args.log_level.is_none() => l.parse()?,
        _ => cfg.log_level,
    };
    crate::log::set_level(level);
    crate::agent::run(cfg)?;
    Ok(ExitCode::SUCCESS)
}
