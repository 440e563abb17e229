//! One place where the command line, the environment, the config file and the defaults become
//! what a peer runs with, so a program that embeds meshbus can do exactly what `meshbus up`
//! does. Precedence: a flag, then the environment (`MESHBUS_API`, `MESHBUS_DATA_DIR`), then
//! the file's `[node]` section, then the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::Multiaddr;

use super::file::{ConfigFile, ConfigFileError};
use super::{default_listen, Config, ConfigError, API_ENV, DATA_DIR_ENV, DEFAULT_API};
use crate::handlers::{Action, HandlerSpec};
use crate::identity::{self, Identity, IdentityError};
use crate::topic::Pattern;

/// What `meshbus up` was told on its command line; `None`, `false` and empty mean "not
/// given", so the environment, the file or the default decide.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--name`.
    pub name: Option<String>,
    /// `--listen` (repeatable).
    pub listen: Vec<Multiaddr>,
    /// `--peer` (repeatable); added to the file's `peers`.
    pub peers: Vec<Multiaddr>,
    /// `--no-mdns`.
    pub no_mdns: bool,
    /// `--api`.
    pub api: Option<SocketAddr>,
    /// `--config`: the file, re-read on every reload.
    pub config: Option<PathBuf>,
    /// `--on` rows, after the file's rows.
    pub on: Vec<HandlerSpec>,
    /// `--quiet`: no default `**=log` row.
    pub quiet: bool,
    /// `--max-event-size`.
    pub max_event_size: Option<usize>,
    /// `--exec-timeout`.
    pub exec_timeout: Option<Duration>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--replay`: handle again what the log holds from this last stretch of time.
    pub replay: Option<Duration>,
    /// `--open`: anyone who reaches the port may join (no mesh key).
    pub open: bool,
}

/// Why the settings could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The config file is unreadable or wrong.
    #[error(transparent)]
    File(#[from] ConfigFileError),
    /// The data directory or its key.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A setting out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The mesh keys.
    #[error(transparent)]
    Keyring(#[from] crate::keyring::KeyringError),
    /// The API token.
    #[error(transparent)]
    Token(#[from] crate::api::access::TokenError),
    /// An environment variable that does not parse.
    #[error("${name}: `{value}` is not {expected}")]
    Env {
        /// The variable.
        name: &'static str,
        /// Its value (lossy if it is not UTF-8).
        value: String,
        /// What it should be.
        expected: &'static str,
    },
}

/// Everything a peer runs with.
#[derive(Debug)]
pub struct Resolved {
    /// The node's settings, its key included.
    pub node: Config,
    /// Where to serve the HTTP API.
    pub api: SocketAddr,
    /// The data directory, and the lock on it while this lives.
    pub identity: Identity,
    /// How to build the table again on a reload (the table to start with is in `node`).
    pub table: TableSource,
    /// The mesh keys in force, `None` for an open mesh; and whether this start made them.
    pub keys: Option<(crate::keyring::Keyring, bool)>,
    /// Tokens the API accepts: the data directory's own (`api.token`) first.
    pub tokens: Vec<crate::api::Token>,
}

/// Where the handler table comes from: the file's rows, then `--on` rows, then the default
/// log row unless quiet. A reload builds it the same way from a fresh read of the file.
#[derive(Debug, Clone)]
pub struct TableSource {
    path: Option<PathBuf>,
    on: Vec<HandlerSpec>,
    quiet: bool,
}

impl TableSource {
    /// Reads the file again and builds the table.
    pub fn load(&self) -> Result<Vec<HandlerSpec>, ConfigFileError> {
        let file_rows = match &self.path {
            Some(path) => ConfigFile::load(path)?.handlers,
            None => Vec::new(),
        };
        Ok(self.assemble(file_rows))
    }

    fn assemble(&self, mut rows: Vec<HandlerSpec>) -> Vec<HandlerSpec> {
        rows.extend(self.on.iter().cloned());
        if !self.quiet {
            rows.push(HandlerSpec::new(Pattern::all(), Action::Log));
        }
        rows
    }
}

/// Resolves flags, environment, file and defaults (reading the file once), and opens the
/// data directory's identity.
pub fn resolve(flags: Flags) -> Result<Resolved, ResolveError> {
    let file = match &flags.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let path = flags.config.clone().unwrap_or_default();
    let n = &file.node;
    let data_dir = match flags
        .data_dir
        .or(env(DATA_DIR_ENV)?.map(PathBuf::from))
        .or(n.data_dir.clone())
    {
        Some(dir) => dir,
        None => identity::default_data_dir()?,
    };
    let api = match flags.api {
        Some(api) => api,
        None => match env(API_ENV)? {
            Some(value) => value.parse().map_err(|_| ResolveError::Env {
                name: API_ENV,
                value,
                expected: "a host:port address",
            })?,
            None => n.api.unwrap_or(DEFAULT_API),
        },
    };
    let listen = match (flags.listen.is_empty(), &n.listen) {
        (false, _) => flags.listen,
        (true, Some(addrs)) => multiaddrs(&path, "listen", addrs)?,
        (true, None) => default_listen(),
    };
    let mut peers = multiaddrs(&path, "peers", &n.peers)?;
    peers.extend(flags.peers);
    let identity = identity::load_or_create(&data_dir)?;
    let keys = match flags.open {
        true => None,
        false => Some(crate::keyring::Keyring::load_or_create(&data_dir)?),
    };
    let mut tokens = vec![crate::api::Token::load_or_create(&data_dir)?];
    tokens.extend(file.tokens.iter().cloned());
    let node = Config {
        mesh: match flags.open {
            true => super::Mesh::Open,
            false => super::Mesh::DataDir,
        },
        name: flags.name.or(n.name.clone()),
        keypair: Some(identity.keypair.clone()),
        listen,
        peers,
        mdns: !flags.no_mdns && n.mdns.unwrap_or(true),
        max_event_size: flags
            .max_event_size
            .or(n.max_event_size)
            .unwrap_or(super::DEFAULT_MAX_EVENT_SIZE),
        exec_timeout: flags
            .exec_timeout
            .or(n.exec_timeout)
            .unwrap_or(super::DEFAULT_EXEC_TIMEOUT),
        data_dir: Some(data_dir),
        replay: flags.replay,
        acl: file.acl.clone(),
        max_messages_per_sec: n
            .max_messages_per_sec
            .unwrap_or(crate::proto::limits::DEFAULT_MESSAGES_PER_SEC),
        max_bytes_per_sec: n
            .max_bytes_per_sec
            .unwrap_or(crate::proto::limits::DEFAULT_BYTES_PER_SEC),
        ..Config::default()
    };
    node.validate()?;
    let table = TableSource {
        path: flags.config,
        on: flags.on,
        quiet: flags.quiet || n.quiet.unwrap_or(false),
    };
    let node = Config {
        handlers: table.assemble(file.handlers),
        ..node
    };
    Ok(Resolved {
        node,
        api,
        identity,
        table,
        keys,
        tokens,
    })
}

/// An environment variable's value; unset and empty are both "not given".
fn env(name: &'static str) -> Result<Option<String>, ResolveError> {
    match std::env::var(name) {
        Ok(value) if value.is_empty() => Ok(None),
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(value)) => Err(ResolveError::Env {
            name,
            value: value.to_string_lossy().into_owned(),
            expected: "UTF-8 text",
        }),
    }
}

/// `[node] KEY` addresses, or an error naming the file and the key.
fn multiaddrs(path: &Path, key: &str, addrs: &[String]) -> Result<Vec<Multiaddr>, ConfigFileError> {
    addrs
        .iter()
        .map(|a| {
            a.parse().map_err(|e| ConfigFileError {
                path: path.to_owned(),
                line: 0,
                message: format!("[node] {key}: `{a}` is not a multiaddr ({e})"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags_in(dir: &Path) -> Flags {
        Flags {
            data_dir: Some(dir.join("data")),
            api: Some("127.0.0.1:1".parse().unwrap()),
            ..Flags::default()
        }
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("meshbus.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "[node]\nname = \"file\"\nmdns = false\nmax_event_size = 1000\n\
             peers = [\"/ip4/127.0.0.1/tcp/9\"]\n",
        );
        let flags = Flags {
            config: Some(path),
            name: Some("flag".into()),
            peers: vec!["/ip4/127.0.0.1/tcp/8".parse().unwrap()],
            ..flags_in(dir.path())
        };
        let r = resolve(flags).unwrap();
        assert_eq!(r.node.name.as_deref(), Some("flag"));
        assert!(!r.node.mdns);
        assert_eq!(r.node.max_event_size, 1000);
        assert_eq!(r.node.peers.len(), 2, "file peers and flag peers together");
        assert_eq!(r.node.listen, default_listen());
    }

    #[test]
    fn the_table_is_file_rows_then_flag_rows_then_the_log_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "[[handler]]\nname = \"first\"\npattern = \"a.*\"\n[handler.log]\n",
        );
        let flags = Flags {
            config: Some(path.clone()),
            on: vec!["b.*=log".parse().unwrap()],
            ..flags_in(dir.path())
        };
        let r = resolve(flags).unwrap();
        let patterns: Vec<String> = r
            .node
            .handlers
            .iter()
            .map(|h| h.pattern.to_string())
            .collect();
        assert_eq!(patterns, ["a.*", "b.*", "**"]);
        write(
            dir.path(),
            "[node]\nquiet = true\n[[handler]]\npattern = \"c.*\"\n[handler.log]\n",
        );
        let again = r.table.load().unwrap();
        assert_eq!(
            again[0].pattern.to_string(),
            "c.*",
            "a reload reads the file anew"
        );
    }

    #[test]
    fn a_bad_address_in_the_file_names_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[node]\nlisten = [\"nonsense\"]\n");
        let flags = Flags {
            config: Some(path),
            ..flags_in(dir.path())
        };
        let e = resolve(flags).unwrap_err().to_string();
        assert!(
            e.contains("meshbus.toml") && e.contains("[node] listen"),
            "{e}"
        );
    }

    #[test]
    fn the_environment_counts_between_flags_and_the_file() {
        // The only test that sets these variables; every other one passes both as flags.
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[node]\napi = \"127.0.0.1:3\"\n");
        std::env::set_var(API_ENV, "127.0.0.1:2");
        std::env::set_var(DATA_DIR_ENV, dir.path().join("env-data"));
        let flags = Flags {
            config: Some(path.clone()),
            ..Flags::default()
        };
        let r = resolve(flags.clone()).unwrap();
        assert_eq!(r.api.port(), 2, "environment over file");
        assert_eq!(r.identity.dir, dir.path().join("env-data"));
        drop(r);
        let r = resolve(Flags {
            api: Some("127.0.0.1:1".parse().unwrap()),
            ..flags.clone()
        })
        .unwrap();
        assert_eq!(r.api.port(), 1, "flag over environment");
        drop(r);
        std::env::set_var(API_ENV, "");
        assert_eq!(
            resolve(flags.clone()).unwrap().api.port(),
            3,
            "empty is unset"
        );
        std::env::set_var(API_ENV, "nonsense");
        let e = resolve(flags).unwrap_err().to_string();
        std::env::remove_var(API_ENV);
        std::env::remove_var(DATA_DIR_ENV);
        assert!(e.contains("$MESHBUS_API") && e.contains("nonsense"), "{e}");
    }

    #[test]
    fn out_of_range_settings_are_refused_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let flags = Flags {
            max_event_size: Some(0),
            ..flags_in(dir.path())
        };
        assert!(matches!(resolve(flags), Err(ResolveError::Config(_))));
    }
}
