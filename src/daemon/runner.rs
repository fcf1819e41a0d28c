//! What every dpuctl daemon does the same way: resolve its settings, take its lock, load its
//! allowlist, open its control socket, handle signals, tell systemd, and shut down cleanly.
//!
//! A daemon calls [`Daemon::start`] (which also returns the channel of SIGHUP reload requests),
//! binds its own listeners, calls [`Daemon::ready`], then [`Daemon::serve_until_shutdown`],
//! which applies reloads until SIGTERM/SIGINT cancels [`Daemon::shutdown`].
//!
//! Concurrency: the allowlist is a [`SharedAllowlist`] read by request handlers and written by
//! the control socket and reloads; persisting to the whitelist file is serialised by
//! `persist_lock` so two `qtcfg --persist` calls cannot write out of order.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use futures::future::BoxFuture;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::allowlist::{Allowlist, EntryStyle, ListType, SharedAllowlist};
use crate::config::{Config, Source};
use crate::daemon::control::{self, ControlHandler, Request};
use crate::daemon::status::{DaemonStatus, PeerStatus};
use crate::daemon::{LogHandle, LogTarget};
use crate::wire::{Auth, Psk};

/// How often a daemon run by systemd refreshes its one-line `STATUS=`.
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Settings shared by every daemon, after command-line overrides.
#[derive(Debug, Clone)]
pub struct CommonArgs {
    pub config: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub insecure: bool,
    pub run_dir: Option<PathBuf>,
    pub log_level: Option<String>,
    pub whitelist: Option<PathBuf>,
}

/// Why a daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("invalid configuration ({origin}):\n  {}", .problems.join("\n  "))]
    Invalid {
        /// Where the settings came from: the config file, or the command line alone.
        origin: String,
        problems: Vec<String>,
    },
    #[error("{0}")]
    Key(#[from] crate::wire::KeyError),
    #[error("cannot start logging: {0}")]
    Logging(String),
    #[error("{0}")]
    Lock(String),
    #[error("cannot load the allowlist: {0}")]
    Allowlist(#[from] crate::allowlist::AllowlistError),
    #[error("cannot open the control socket: {0}")]
    Control(#[from] control::ControlError),
    #[error("cannot listen on {addr}: {source} (is another program using the port? pick another with --listen)")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

/// Loads the config file and applies the common overrides. Returns the config, where it came
/// from, and the validation problems that concern every daemon.
pub fn resolve(args: &CommonArgs) -> Result<(Config, Source), StartError> {
    let (mut config, source) = Config::load(args.config.as_deref())?;
    let c = &mut config.common;
    if let Some(k) = &args.key_file {
        c.key_file = k.clone();
    }
    if args.insecure {
        c.insecure = true;
    }
    if let Some(d) = &args.run_dir {
        c.run_dir = d.clone();
    }
    if let Some(l) = &args.log_level {
        c.log_level = l.clone();
    }
    if let Some(w) = &args.whitelist {
        c.whitelist = w.clone();
    }
    Ok((config, source))
}

/// The link authentication the common settings call for. No key and no explicit insecure
/// mode is an error that says how to fix it.
pub fn auth(config: &Config) -> Result<Auth, StartError> {
    if config.common.insecure {
        tracing::warn!(
            "insecure mode: links are NOT authenticated; use only on a closed test network"
        );
        return Ok(Auth::Insecure);
    }
    Ok(Auth::Psk(Arc::new(Psk::load(&config.common.key_file)?)))
}

/// Daemon-specific parts of the status, filled in on every `status` request.
pub trait StatusSource: Send + Sync + 'static {
    fn listen(&self) -> Vec<String>;
    fn peers(&self) -> Vec<PeerStatus>;
    fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        Default::default()
    }
    fn mount(&self) -> Option<Box<crate::daemon::status::MountStatus>> {
        None
    }
    fn connections(&self) -> Vec<crate::daemon::status::ConnectionStatus> {
        Vec::new()
    }
    fn sessions(&self) -> Vec<crate::daemon::status::SessionStatus> {
        Vec::new()
    }
    /// Sends `signal` to the process of session `id` (the `session_kill` request).
    fn kill_session(&self, id: u64, signal: i32) -> Result<(), String> {
        let _ = (id, signal);
        Err("this daemon runs no rexec sessions: send session_kill to rexec_server".into())
    }
}

/// A running daemon's shared state.
pub struct Daemon {
    pub name: String,
    pub started: Instant,
    pub log: LogHandle,
    pub allowlist: SharedAllowlist,
    pub shutdown: CancellationToken,
    control_path: PathBuf,
    whitelist: RwLock<PathBuf>,
    config_source: Source,
    cli: CommonArgs,
    /// Serialises whitelist file writes (see module docs).
    persist_lock: Mutex<()>,
    /// Held for the daemon's life: a second instance fails to take it.
    _lock: crate::daemon::Lock,
    /// Set once the daemon knows its listeners; until then status shows none.
    status_source: RwLock<Option<Arc<dyn StatusSource>>>,
}

impl Daemon {
    /// Logging, lock, allowlist, control socket and signal handling. Returns the daemon and
    /// the receiver of reload requests (SIGHUP).
    pub async fn start(
        name: &str,
        config: &Config,
        source: Source,
        cli: CommonArgs,
    ) -> Result<(Arc<Daemon>, tokio::sync::mpsc::Receiver<()>), StartError> {
        let log = crate::daemon::logging::init(name, &config.common.log_level, LogTarget::Stderr)
            .map_err(|e| StartError::Logging(e.to_string()))?;
        let problems = config.validate();
        if !problems.is_empty() {
            let origin = if source.present {
                format!("{} and the command line", source.path.display())
            } else {
                format!(
                    "the command line and defaults; there is no {}",
                    source.path.display()
                )
            };
            return Err(StartError::Invalid { origin, problems });
        }
        let run_dir = &config.common.run_dir;
        let lock = crate::daemon::Lock::acquire(run_dir, name)
            .map_err(|e| StartError::Lock(e.to_string()))?;
        let allowlist = Allowlist::load(&config.common.whitelist)?;
        let control_path = control::socket_path(run_dir, name);
        let listener = control::bind(&control_path)?;
        let shutdown = CancellationToken::new();
        let reloads = crate::daemon::signals::spawn(shutdown.clone());
        let daemon = Arc::new(Daemon {
            name: name.to_string(),
            started: Instant::now(),
            log: log.clone(),
            allowlist: Arc::new(RwLock::new(allowlist)),
            shutdown: shutdown.clone(),
            control_path,
            whitelist: RwLock::new(config.common.whitelist.clone()),
            config_source: source,
            cli,
            persist_lock: Mutex::new(()),
            _lock: lock,
            status_source: RwLock::new(None),
        });
        let handler: Arc<dyn ControlHandler> = Arc::new(Handler(daemon.clone()));
        tokio::spawn(control::serve(listener, handler, log, shutdown));
        Ok((daemon, reloads))
    }

    /// Where the daemon's own status details come from.
    pub fn set_status_source(&self, source: Arc<dyn StatusSource>) {
        *self
            .status_source
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    /// Tells systemd (Type=notify) and the log that the daemon serves.
    pub fn ready(&self) {
        crate::daemon::notify::ready();
        tracing::info!(
            control = %self.control_path.display(),
            version = env!("CARGO_PKG_VERSION"),
            "{} ready",
            self.name
        );
    }

    /// Runs until shutdown, applying reloads as they come.
    pub async fn serve_until_shutdown(
        self: &Arc<Self>,
        mut reloads: tokio::sync::mpsc::Receiver<()>,
    ) {
        // systemctl status shows what the daemon does now, refreshed every few seconds.
        let notify = crate::daemon::notify::enabled();
        let mut summary = tokio::time::interval(STATUS_EVERY);
        summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = summary.tick(), if notify => {
                    crate::daemon::notify::status(&self.status().summary());
                }
                r = reloads.recv() => match r {
                    Some(()) => {
                        crate::daemon::notify::reloading();
                        if let Err(e) = self.reload() {
                            tracing::error!(error = %e, "reload failed; keeping the previous settings");
                        }
                        crate::daemon::notify::ready();
                    }
                    None => { self.shutdown.cancelled().await; break; }
                },
            }
        }
        crate::daemon::notify::stopping();
        tracing::info!("{} shutting down", self.name);
    }

    /// Re-reads the config file's log level and whitelist path, then the whitelist. On any
    /// error nothing changes.
    pub fn reload(&self) -> Result<(), String> {
        let explicit = self.cli.config.clone().or_else(|| {
            self.config_source
                .present
                .then(|| self.config_source.path.clone())
        });
        let args = CommonArgs {
            config: explicit,
            ..self.cli.clone()
        };
        let (config, _) = resolve(&args).map_err(|e| e.to_string())?;
        let list = Allowlist::load(&config.common.whitelist).map_err(|e| e.to_string())?;
        if config.common.log_level != self.log.level() {
            self.log
                .set_level(&config.common.log_level)
                .map_err(|e| e.to_string())?;
        }
        *self.whitelist.write().unwrap_or_else(|p| p.into_inner()) =
            config.common.whitelist.clone();
        *self.allowlist.write().unwrap_or_else(|p| p.into_inner()) = list;
        tracing::info!(whitelist = %config.common.whitelist.display(), "configuration and allowlists reloaded");
        Ok(())
    }

    /// This daemon's status.
    pub fn status(&self) -> DaemonStatus {
        let source = self
            .status_source
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let allowlists = {
            let list = self.allowlist.read().unwrap_or_else(|p| p.into_inner());
            ListType::ALL
                .into_iter()
                .filter(|t| !list.entries(*t).is_empty())
                .map(|t| {
                    let paths = list
                        .entries(t)
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect();
                    (t.name().to_string(), paths)
                })
                .collect()
        };
        DaemonStatus {
            name: self.name.clone(),
            pid: std::process::id(),
            control: self.control_path.display().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            listen: source.as_ref().map(|s| s.listen()).unwrap_or_default(),
            peers: source.as_ref().map(|s| s.peers()).unwrap_or_default(),
            allowlists,
            log_level: self.log.level(),
            counters: source.as_ref().map(|s| s.counters()).unwrap_or_default(),
            mount: source.as_ref().and_then(|s| s.mount()),
            connections: source.as_ref().map(|s| s.connections()).unwrap_or_default(),
            sessions: source.as_ref().map(|s| s.sessions()).unwrap_or_default(),
        }
    }

    /// Applies an allowlist change in memory (at once, for the next request) and, if asked,
    /// writes the whitelist file atomically.
    fn edit_allowlist(&self, req: Request) -> Result<Map<String, Value>, String> {
        let mut answer = Map::new();
        let (persist, snapshot) = {
            let mut list = self.allowlist.write().unwrap_or_else(|p| p.into_inner());
            let persist = match req {
                Request::AllowlistList { list_type } => {
                    answer.insert("allowlists".into(), Value::Object(list.to_json(list_type)));
                    false
                }
                Request::AllowlistAdd {
                    list_type,
                    path,
                    persist,
                } => {
                    let index = list.add(list_type, &path).map_err(|e| e.to_string())?;
                    tracing::info!(r#type = list_type.name(), path = %path, index, "allowlist entry added");
                    answer.insert("index".into(), Value::from(index));
                    persist
                }
                Request::AllowlistDelete {
                    list_type,
                    index,
                    persist,
                } => {
                    let removed = list.remove(list_type, index).map_err(|e| e.to_string())?;
                    tracing::info!(r#type = list_type.name(), path = %removed.display(), index, "allowlist entry removed");
                    answer.insert(
                        "removed".into(),
                        Value::String(removed.display().to_string()),
                    );
                    persist
                }
                other => return Err(format!("{other:?} is not an allowlist request")),
            };
            (persist, persist.then(|| list.clone()))
        };
        if let (true, Some(list)) = (persist, snapshot) {
            let _guard = self.persist_lock.lock().unwrap_or_else(|p| p.into_inner());
            let path = self.whitelist_path();
            list.save_atomic(&path, EntryStyle::PathList).map_err(|e| {
                format!(
                    "the change is live but was not saved to {}: {e}",
                    path.display()
                )
            })?;
            answer.insert(
                "persisted".into(),
                Value::String(path.display().to_string()),
            );
        }
        Ok(answer)
    }

    fn whitelist_path(&self) -> PathBuf {
        self.whitelist
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The control socket path.
    pub fn control_path(&self) -> &Path {
        &self.control_path
    }
}

/// The control-socket face of a [`Daemon`].
struct Handler(Arc<Daemon>);

impl ControlHandler for Handler {
    fn status(&self) -> DaemonStatus {
        self.0.status()
    }

    fn handle(&self, req: Request) -> BoxFuture<'static, Result<Map<String, Value>, String>> {
        let daemon = self.0.clone();
        Box::pin(async move {
            match req {
                Request::SessionKill { id, signal } => {
                    let source = daemon
                        .status_source
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone()
                        .ok_or_else(|| "the daemon is still starting: try again".to_string())?;
                    source.kill_session(id, signal)?;
                    Ok(Map::new())
                }
                Request::Reload => {
                    tokio::task::spawn_blocking(move || daemon.reload())
                        .await
                        .map_err(|e| format!("reload task failed: {e}"))??;
                    Ok(Map::new())
                }
                req => tokio::task::spawn_blocking(move || daemon.edit_allowlist(req))
                    .await
                    .map_err(|e| format!("allowlist task failed: {e}"))?,
            }
        })
    }
}
