//! `/etc/dpuctl/config.toml`: one serde struct per tool, unknown keys refused, defaults in code.
//!
//! Precedence is command line > file > defaults. The file is optional at its default path
//! (defaults apply) and required when named with `--config` or `DPUCTL_CONFIG`.
//! [`Config::validate`] is the single place that checks values; the daemons call it before
//! starting and `dpuctl config check` prints its findings.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::wire::Addr;

/// Where the config file is read from when nothing else is said.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dpuctl/config.toml";
/// Environment variable naming another config file.
pub const CONFIG_ENV: &str = "DPUCTL_CONFIG";

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub common: Common,
    pub engine: EngineConfig,
    pub udsproxyd: UdsproxydConfig,
}

/// Settings every tool shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Common {
    /// Pre-shared key file (`dpuctl keygen`), the same file on both sides.
    pub key_file: PathBuf,
    /// Run without authentication. For test setups only: every link warns.
    pub insecure: bool,
    /// Control sockets and lock files.
    pub run_dir: PathBuf,
    /// Log filter: `error`, `warn`, `info`, `debug`, `trace` or an EnvFilter directive.
    pub log_level: String,
    /// The allowlist file shared by the engine and udsproxyd.
    pub whitelist: PathBuf,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            key_file: PathBuf::from(crate::wire::key::DEFAULT_KEY_PATH),
            insecure: false,
            run_dir: PathBuf::from(crate::daemon::control::DEFAULT_RUN_DIR),
            log_level: "info".to_string(),
            whitelist: PathBuf::from("/etc/qtfs/whitelist"),
        }
    }
}

/// The HOST-side `engine`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// File service address (qtfs clients connect here).
    pub listen: String,
    /// Worker pool size of the file service: requests served at once across all clients.
    pub threads: usize,
    /// Worker pool size of the built-in udsproxyd peer.
    pub uds_threads: usize,
    /// Where the built-in udsproxyd peer listens; empty disables the peer.
    pub uds_listen: String,
    /// The DPU's udsproxyd to dial; empty means wait for it to dial us.
    pub uds_peer: String,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            listen: "tcp://0.0.0.0:12345".to_string(),
            threads: 16,
            uds_threads: 1,
            uds_listen: "tcp://0.0.0.0:12121".to_string(),
            uds_peer: String::new(),
        }
    }
}

/// The `udsproxyd` peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UdsproxydConfig {
    /// Where this peer listens for the other peer; empty means dial only.
    pub listen: String,
    /// The other peer to dial; empty means wait for it to dial us.
    pub peer: String,
    /// Worker pool size.
    pub threads: usize,
    /// Local clients ask for remote connections on this Unix socket; empty means
    /// `<run_dir>/remote_uds.sock` (`/var/run/qtfs/remote_uds.sock` by default). The engine's
    /// built-in peer uses it too.
    pub request_socket: PathBuf,
    /// Permission bits of the request socket (default 0o600: only root may ask for remote
    /// connections, since the far side connects as its daemon, usually root).
    pub request_socket_mode: u32,
}

impl UdsproxydConfig {
    /// The request socket path, given the daemon's run directory.
    pub fn request_socket_path(&self, run_dir: &Path) -> PathBuf {
        if self.request_socket.as_os_str().is_empty() {
            run_dir.join("remote_uds.sock")
        } else {
            self.request_socket.clone()
        }
    }
}

impl Default for UdsproxydConfig {
    fn default() -> Self {
        UdsproxydConfig {
            listen: "tcp://0.0.0.0:12121".to_string(),
            peer: String::new(),
            threads: 1,
            request_socket: PathBuf::new(),
            request_socket_mode: 0o600,
        }
    }
}

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {}", .problems.join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// Where the config came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub path: PathBuf,
    /// False when the default file was absent and defaults apply.
    pub present: bool,
}

impl Config {
    /// Loads the config a tool should use: `explicit` (from `--config`), else `DPUCTL_CONFIG`,
    /// else the default path, which may be absent.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, Source), ConfigError> {
        let named = explicit
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from));
        let (path, required) = match named {
            Some(p) => (p, true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok((
                Config::parse(&text, &path)?,
                Source {
                    path,
                    present: true,
                },
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok((
                Config::default(),
                Source {
                    path,
                    present: false,
                },
            )),
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// Parses config text; syntax errors and unknown keys name the line and column.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: describe_toml_error(text, &e),
        })
    }

    /// Every problem with the values, each saying which key and what to do. Empty means valid.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let c = &self.common;
        if !c.insecure {
            if let Err(e) = crate::wire::Psk::load(&c.key_file) {
                problems.push(format!("common.key_file: {e}"));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&c.log_level) {
            problems.push(format!(
                "common.log_level = {:?}: {e}; use error, warn, info, debug or trace",
                c.log_level
            ));
        }
        if !c.run_dir.is_absolute() {
            problems.push(format!(
                "common.run_dir = {:?}: must be an absolute path",
                c.run_dir
            ));
        }
        if let Err(e) = crate::allowlist::Allowlist::load(&c.whitelist) {
            problems.push(format!("common.whitelist: {e}"));
        }
        check_addr(&mut problems, "engine.listen", &self.engine.listen, false);
        check_addr(
            &mut problems,
            "engine.uds_listen",
            &self.engine.uds_listen,
            true,
        );
        check_addr(
            &mut problems,
            "engine.uds_peer",
            &self.engine.uds_peer,
            true,
        );
        check_threads(&mut problems, "engine.threads", self.engine.threads);
        check_threads(&mut problems, "engine.uds_threads", self.engine.uds_threads);
        check_addr(
            &mut problems,
            "udsproxyd.listen",
            &self.udsproxyd.listen,
            true,
        );
        check_addr(&mut problems, "udsproxyd.peer", &self.udsproxyd.peer, true);
        check_threads(&mut problems, "udsproxyd.threads", self.udsproxyd.threads);
        if self.udsproxyd.listen.is_empty() && self.udsproxyd.peer.is_empty() {
            problems.push(
                "udsproxyd: neither listen nor peer is set; set at least one so the peers can meet"
                    .to_string(),
            );
        }
        if !self.udsproxyd.request_socket.as_os_str().is_empty()
            && !self.udsproxyd.request_socket.is_absolute()
        {
            problems.push(format!(
                "udsproxyd.request_socket = {:?}: must be an absolute path (or empty for <run_dir>/remote_uds.sock)",
                self.udsproxyd.request_socket
            ));
        }
        if self.udsproxyd.request_socket_mode > 0o777 {
            problems.push(format!(
                "udsproxyd.request_socket_mode = {:#o}: give permission bits only, e.g. 0o600 or 0o660",
                self.udsproxyd.request_socket_mode
            ));
        }
        problems
    }
}

/// Parses an optional address setting: empty means "not set".
pub fn optional_addr(value: &str) -> Result<Option<Addr>, crate::wire::AddrError> {
    if value.is_empty() {
        Ok(None)
    } else {
        value.parse().map(Some)
    }
}

fn check_addr(problems: &mut Vec<String>, key: &str, value: &str, may_be_empty: bool) {
    if value.is_empty() {
        if !may_be_empty {
            problems.push(format!("{key}: must be set, e.g. tcp://0.0.0.0:12345"));
        }
        return;
    }
    if let Err(e) = value.parse::<Addr>() {
        problems.push(format!("{key} = {value:?}: {e}"));
    }
}

fn check_threads(problems: &mut Vec<String>, key: &str, value: usize) {
    if !(1..=65536).contains(&value) {
        problems.push(format!("{key} = {value}: must be between 1 and 65536"));
    }
}

/// toml's message plus, where it gives a span, the line number and the offending line.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let content = text.lines().nth(line - 1).unwrap_or("").trim();
            format!(
                "line {line}: {message} (at `{content}`); see config.example.toml for every key"
            )
        }
        None => format!("{message}; see config.example.toml for every key"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let c = Config::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.engine.listen, "tcp://0.0.0.0:12345");
        assert_eq!(c.udsproxyd.listen, "tcp://0.0.0.0:12121");
    }

    #[test]
    fn example_file_parses_to_the_defaults() {
        let text = include_str!("../config.example.toml");
        let c = Config::parse(text, Path::new("config.example.toml")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = "[common]\nlog_level = \"debug\"\nkey_fiel = \"/x\"\n";
        let err = Config::parse(text, Path::new("/etc/dpuctl/config.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("key_fiel"), "{msg}");
        assert!(msg.starts_with("/etc/dpuctl/config.toml: "), "{msg}");
    }

    #[test]
    fn wrong_type_names_line() {
        let text = "[engine]\n\nthreads = \"many\"\n";
        let msg = Config::parse(text, Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn validate_reports_each_bad_value() {
        let mut c = Config::default();
        c.common.insecure = true;
        c.common.whitelist = PathBuf::from("/nonexistent/whitelist");
        c.engine.listen = "ftp://x".to_string();
        c.engine.threads = 0;
        c.common.log_level = "loud=[".to_string();
        c.udsproxyd.listen.clear();
        let problems = c.validate();
        let all = problems.join("\n");
        assert!(all.contains("engine.listen"), "{all}");
        assert!(all.contains("engine.threads = 0"), "{all}");
        assert!(all.contains("common.log_level"), "{all}");
        assert!(all.contains("neither listen nor peer"), "{all}");
        assert_eq!(problems.len(), 4, "{all}");
    }

    #[test]
    fn missing_key_file_says_how_to_fix() {
        let mut c = Config::default();
        c.common.key_file = PathBuf::from("/nonexistent/psk");
        c.common.whitelist = PathBuf::from("/nonexistent/whitelist");
        let all = c.validate().join("\n");
        assert!(all.contains("common.key_file"), "{all}");
        assert!(all.contains("dpuctl keygen"), "{all}");
    }
}
