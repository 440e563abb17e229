//! The config file (`meshbus up --config meshbus.toml`): node settings and the handler table.
//!
//! Every key is documented in the README, and `examples/meshbus.toml` is a complete example
//! (the tests load it). An error names the file, the line and the key, and says what was
//! expected; nothing half-read is ever used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::handlers::{
    Action, CommandLine, ExecAction, FileAction, HandlerSpec, HttpAction, HttpMode, RowOptions,
    DEFAULT_HTTP_TIMEOUT, MAX_CONCURRENCY, MAX_QUEUE,
};

/// Most rotated files a `file` row keeps.
pub const MAX_KEEP: usize = 1000;
use crate::topic::Pattern;

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {message}")]
pub struct ConfigFileError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line of the problem (0 when it is not tied to a line).
    pub line: usize,
    /// What is wrong and what was expected.
    pub message: String,
}

/// What the file says.
#[derive(Debug, Clone, Default)]
pub struct ConfigFile {
    /// `[node]`.
    pub node: NodeSection,
    /// `[[handler]]` rows, in file order.
    pub handlers: Vec<HandlerSpec>,
    /// `[[acl]]` rules: who may publish what (open when there are none).
    pub acl: crate::proto::Acl,
    /// `[[token]]` rows: more API tokens, each limited to reading or to publishing on some
    /// patterns (the data directory's `api.token` has full access).
    pub tokens: Vec<crate::api::Token>,
}

/// `[node]`: settings that the command line overrides.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Peer name.
    pub name: Option<String>,
    /// Listen multiaddrs.
    pub listen: Option<Vec<String>>,
    /// Peers to dial.
    #[serde(default)]
    pub peers: Vec<String>,
    /// mDNS discovery.
    pub mdns: Option<bool>,
    /// HTTP API address.
    pub api: Option<std::net::SocketAddr>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Largest event.
    pub max_event_size: Option<usize>,
    /// Default time limit of exec handlers.
    #[serde(default, deserialize_with = "duration_opt")]
    pub exec_timeout: Option<Duration>,
    /// No default `**=log` row.
    pub quiet: Option<bool>,
    /// Gossip messages a second one author may send.
    pub max_messages_per_sec: Option<u32>,
    /// Gossip bytes a second one author may send.
    pub max_bytes_per_sec: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    node: NodeSection,
    #[serde(default)]
    handler: Vec<toml::Spanned<RawHandler>>,
    #[serde(default)]
    acl: Vec<toml::Spanned<RawAcl>>,
    #[serde(default)]
    token: Vec<toml::Spanned<RawToken>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    /// A file holding the secret (kept out of the config, which more people read).
    secret_file: PathBuf,
    /// `read`, or `publish` with `publish` patterns.
    access: String,
    #[serde(default)]
    publish: Vec<String>,
}

impl RawToken {
    fn into_token(self) -> Result<crate::api::Token, String> {
        use crate::api::{Scope, Token};
        let scope = match (self.access.as_str(), self.publish.is_empty()) {
            ("read", true) => Scope::Read,
            ("publish", false) => Scope::Publish(
                self.publish
                    .into_iter()
                    .map(|p| Pattern::new(p).map_err(|e| format!("key `publish`: {e}")))
                    .collect::<Result<_, _>>()?,
            ),
            ("read", false) => {
                return Err(
                    "key `publish`: a read token publishes nothing; use access = \"publish\""
                        .into(),
                )
            }
            ("publish", true) => {
                return Err(
                    "key `publish`: a publish token needs the patterns it may publish on".into(),
                )
            }
            (other, _) => {
                return Err(format!(
                    "key `access`: `{other}`; expected \"read\" or \"publish\""
                ))
            }
        };
        let secret = crate::api::access::read_token_file(&self.secret_file)
            .map_err(|e| format!("key `secret_file`: {}: {e}", self.secret_file.display()))?;
        Token::new(&self.name, &secret, scope).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcl {
    peers: Vec<String>,
    publish: Vec<String>,
}

impl RawAcl {
    fn into_rule(self) -> Result<crate::proto::acl::Rule, String> {
        use crate::proto::acl::{Rule, Who};
        if self.peers.is_empty() || self.publish.is_empty() {
            return Err("needs `peers` (peer ids, or \"*\" for every member) and `publish` (topic patterns), neither empty".into());
        }
        let who = self
            .peers
            .iter()
            .map(|p| match p.as_str() {
                "*" => Ok(Who::Any),
                id => id
                    .parse()
                    .map(Who::Peer)
                    .map_err(|e| format!("key `peers`: `{id}` is not a peer id ({e}); expected e.g. 12D3KooW… or \"*\"")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let publish = self
            .publish
            .into_iter()
            .map(|p| Pattern::new(p).map_err(|e| format!("key `publish`: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Rule { who, publish })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandler {
    name: Option<String>,
    pattern: String,
    #[serde(rename = "type")]
    event_type: Option<String>,
    filter: Option<String>,
    transform: Option<String>,
    concurrency: Option<usize>,
    queue: Option<usize>,
    retries: Option<u32>,
    #[serde(default, deserialize_with = "duration_opt")]
    backoff: Option<Duration>,
    #[serde(default, deserialize_with = "duration_opt")]
    backoff_max: Option<Duration>,
    dead_letter: Option<PathBuf>,
    group: Option<String>,
    key: Option<String>,
    #[serde(default)]
    reply: bool,
    log: Option<RawLog>,
    file: Option<RawFile>,
    exec: Option<RawExec>,
    http: Option<RawHttp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: PathBuf,
    max_bytes: Option<u64>,
    #[serde(default)]
    keep: usize,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawCommand {
    Shell(String),
    Argv(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExec {
    command: RawCommand,
    cwd: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration_opt")]
    timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    mode: HttpMode,
    #[serde(default, deserialize_with = "duration_opt")]
    timeout: Option<Duration>,
}

fn duration_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    humantime::parse_duration(&text).map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{text}` is not a duration ({e}); expected e.g. \"500ms\", \"30s\", \"2m\""
        ))
    })
}

/// The line where `[node]`'s `key` is set (the first line starting with it), for messages
/// about values serde has already accepted.
fn key_line(text: &str, key: &str) -> usize {
    key_line_from(text, 1, key).unwrap_or(0)
}

/// The first line from `from` (1-based) on that sets `key`.
fn key_line_from(text: &str, from: usize, key: &str) -> Option<usize> {
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find(|(_, l)| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|(i, _)| i + 1)
}

/// Checks `[node]`'s values, naming the line of a bad one.
fn check_node(node: &NodeSection, text: &str) -> Result<(), (usize, String)> {
    for (key, value) in [
        (
            "max_messages_per_sec",
            node.max_messages_per_sec.map(u64::from),
        ),
        ("max_bytes_per_sec", node.max_bytes_per_sec),
    ] {
        if value == Some(0) {
            return Err((
                key_line(text, key),
                format!("[node] {key} must be at least 1"),
            ));
        }
    }
    if let Some(size) = node.max_event_size {
        let limit = super::max_event_size_limit();
        if size == 0 || size > limit {
            return Err((
                key_line(text, "max_event_size"),
                format!(
                    "[node] max_event_size {size} is out of range: expected 1 to {limit} bytes"
                ),
            ));
        }
    }
    let listen = node.listen.iter().flatten().map(|a| ("listen", a));
    for (key, addr) in listen.chain(node.peers.iter().map(|a| ("peers", a))) {
        let parsed: libp2p::Multiaddr = addr.parse().map_err(|e| {
            (
                key_line(text, key),
                format!("[node] {key}: `{addr}` is not a multiaddr ({e})"),
            )
        })?;
        if !super::is_tcp(&parsed) {
            return Err((
                key_line(text, key),
                format!("[node] {key}: `{addr}` is not a TCP address (like /ip4/10.0.0.2/tcp/7421); meshbus runs on TCP only"),
            ));
        }
    }
    Ok(())
}

/// Largest config file read.
pub const MAX_FILE: usize = 1024 * 1024;

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl ConfigFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigFileError> {
        let text =
            crate::files::read_text_limited(path, MAX_FILE).map_err(|e| ConfigFileError {
                path: path.to_owned(),
                line: 0,
                message: format!("cannot read it: {e}"),
            })?;
        Self::parse(path, &text)
    }

    /// Checks `text` as the contents of `path` (which is only used in messages).
    pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, ConfigFileError> {
        let error = |line: usize, message: String| ConfigFileError {
            path: path.to_owned(),
            line,
            message,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
            error(line, e.message().trim().to_owned())
        })?;
        check_node(&raw.node, text).map_err(|(line, m)| error(line, m))?;
        let mut handlers = Vec::with_capacity(raw.handler.len());
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut groups: BTreeMap<String, usize> = BTreeMap::new();
        for spanned in raw.handler {
            let line = line_of(text, spanned.span().start);
            let row = spanned.into_inner();
            let what = row
                .name
                .as_deref()
                .map(|n| format!("handler `{n}`"))
                .unwrap_or_else(|| format!("handler `{}`", row.pattern));
            if let Some(name) = &row.name {
                if let Some(first) = names.insert(name.clone(), line) {
                    return Err(error(
                        line,
                        format!("{what}: the name is taken by the handler on line {first}; names must be unique"),
                    ));
                }
            }
            let spec = row
                .into_spec()
                .map_err(|m| error(line, format!("{what}: {m}")))?;
            crate::handlers::check_jq(spec.filter.as_deref(), spec.transform.as_deref())
                .map_err(|e| error(line, format!("{what}: {e}")))?;
            spec.check_group().map_err(|m| {
                // Name the line of the key at fault (`group`, `key` or `reply`).
                let key = ["group", "key", "reply"]
                    .into_iter()
                    .find(|k| m.starts_with(&format!("key `{k}`")));
                let at = key
                    .and_then(|k| key_line_from(text, line, k))
                    .unwrap_or(line);
                error(at, format!("{what}: {m}"))
            })?;
            if let Some(group) = &spec.group {
                if groups.len() >= crate::proto::groups::MAX_GROUPS && !groups.contains_key(group) {
                    return Err(error(
                        key_line_from(text, line, "group").unwrap_or(line),
                        format!(
                            "{what}: key `group`: a peer is in at most {} groups",
                            crate::proto::groups::MAX_GROUPS
                        ),
                    ));
                }
                if let Some(first) = groups.insert(group.clone(), line) {
                    return Err(error(
                        line,
                        format!("{what}: key `group`: the handler on line {first} is in group `{group}` already; a peer has one row per group"),
                    ));
                }
            }
            spec.action
                .check()
                .map_err(|m| error(line, format!("{what}: {m}")))?;
            handlers.push(spec);
        }
        let mut rules = Vec::with_capacity(raw.acl.len());
        for spanned in raw.acl {
            let line = line_of(text, spanned.span().start);
            rules.push(
                spanned
                    .into_inner()
                    .into_rule()
                    .map_err(|m| error(line, format!("acl rule: {m}")))?,
            );
        }
        let mut tokens = Vec::with_capacity(raw.token.len());
        for spanned in raw.token {
            let line = line_of(text, spanned.span().start);
            tokens.push(
                spanned
                    .into_inner()
                    .into_token()
                    .map_err(|m| error(line, format!("token: {m}")))?,
            );
        }
        Ok(ConfigFile {
            node: raw.node,
            handlers,
            acl: crate::proto::Acl::new(rules),
            tokens,
        })
    }
}

impl RawHandler {
    fn into_spec(self) -> Result<HandlerSpec, String> {
        let pattern = Pattern::new(self.pattern).map_err(|e| format!("key `pattern`: {e}"))?;
        let event_type = self
            .event_type
            .map(Pattern::new)
            .transpose()
            .map_err(|e| format!("key `type`: {e}"))?;
        let mut actions = Vec::new();
        if self.log.is_some() {
            actions.push(Action::Log);
        }
        if let Some(f) = self.file {
            actions.push(Action::File(FileAction {
                path: f.path,
                max_bytes: f.max_bytes,
                keep: f.keep,
            }));
        }
        if let Some(x) = self.exec {
            let command = match x.command {
                RawCommand::Shell(s) if !s.trim().is_empty() => CommandLine::Shell(s),
                RawCommand::Argv(v) if !v.is_empty() => CommandLine::Argv(v),
                _ => return Err("key `exec.command`: empty; expected a string for `sh -c` or an array [program, args…]".into()),
            };
            actions.push(Action::Exec(ExecAction {
                command,
                cwd: x.cwd,
                timeout: x.timeout,
            }));
        }
        if let Some(h) = self.http {
            if !(h.url.starts_with("http://") || h.url.starts_with("https://")) {
                return Err(format!(
                    "key `http.url`: `{}` is not an http:// or https:// URL",
                    crate::handlers::redact_url(&h.url)
                ));
            }
            actions.push(Action::Http(HttpAction {
                url: h.url,
                headers: h.headers.into_iter().collect(),
                mode: h.mode,
                timeout: h.timeout.unwrap_or(DEFAULT_HTTP_TIMEOUT),
            }));
        }
        if actions.len() != 1 {
            return Err(format!(
                "needs exactly one action table ([handler.log], [handler.file], [handler.exec] or [handler.http]), found {}",
                actions.len()
            ));
        }
        let defaults = RowOptions::default();
        let options = RowOptions {
            concurrency: self.concurrency.unwrap_or(defaults.concurrency),
            queue: self.queue,
            retries: self.retries.unwrap_or(defaults.retries),
            backoff: self.backoff.unwrap_or(defaults.backoff),
            backoff_max: self.backoff_max.unwrap_or(defaults.backoff_max),
            dead_letter: self.dead_letter,
        };
        if !(1..=MAX_CONCURRENCY).contains(&options.concurrency) {
            return Err(format!(
                "key `concurrency`: expected 1 to {MAX_CONCURRENCY}"
            ));
        }
        if options.queue.is_some_and(|q| !(1..=MAX_QUEUE).contains(&q)) {
            return Err(format!("key `queue`: expected 1 to {MAX_QUEUE}"));
        }
        if let Action::File(f) = &actions[0] {
            if f.keep > MAX_KEEP {
                return Err(format!("key `file.keep`: expected 0 to {MAX_KEEP}"));
            }
        }
        Ok(HandlerSpec {
            name: self.name,
            pattern,
            event_type,
            filter: self.filter,
            transform: self.transform,
            options,
            group: self.group,
            key: self.key,
            reply: self.reply,
            action: actions.remove(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfigFile, ConfigFileError> {
        ConfigFile::parse(Path::new("meshbus.toml"), text)
    }

    #[test]
    fn group_rows_load_and_bad_ones_name_the_line_and_key() {
        let ok = parse(
            "[[handler]]\nname = \"b\"\npattern = \"orders.**\"\ngroup = \"billing\"\nkey = \".data.customer\"\n[handler.log]\n\n[[handler]]\nname = \"q\"\npattern = \"ask.*\"\nreply = true\n[handler.exec]\ncommand = [\"true\"]\n",
        )
        .unwrap();
        assert_eq!(ok.handlers[0].group.as_deref(), Some("billing"));
        assert_eq!(ok.handlers[0].key.as_deref(), Some(".data.customer"));
        assert!(ok.handlers[1].reply);
        let cases = [
            (
                "group = \"bill ing\"",
                4,
                "key `group`: group name `bill ing`",
            ),
            ("group = \"\"", 4, "key `group`: a group name has 1 to 64"),
            (
                "group = \"g\"\nkey = \".data | nosuch\"",
                5,
                "key `key`: jq key",
            ),
            (
                "key = \".data.x\"",
                4,
                "key `key`: only a row with a `group`",
            ),
            ("reply = true", 4, "key `reply`: a log row has no output"),
        ];
        for (extra, line, message) in cases {
            let text = format!(
                "[[handler]]\nname = \"b\"\npattern = \"orders.**\"\n{extra}\n[handler.log]\n"
            );
            let err = parse(&text).unwrap_err();
            assert_eq!(err.line, line, "{extra}: {err}");
            assert!(err.to_string().contains(message), "{extra}: {err}");
            assert!(err.to_string().contains("handler `b`"), "{err}");
        }
        let err = parse("[[handler]]\npattern = \"_mesh.**\"\ngroup = \"g\"\n[handler.log]\n")
            .unwrap_err();
        assert!(err.to_string().contains("`_mesh.` events"), "{err}");
        let two = "[[handler]]\npattern = \"a.*\"\ngroup = \"g\"\n[handler.log]\n[[handler]]\npattern = \"b.*\"\ngroup = \"g\"\n[handler.log]\n";
        let many: String = (0..17)
            .map(|i| {
                format!("[[handler]]\npattern = \"a{i}.*\"\ngroup = \"g{i}\"\n[handler.log]\n")
            })
            .collect();
        let err = parse(&many).unwrap_err();
        assert_eq!(err.line, 16 * 4 + 3, "{err}");
        assert!(err.to_string().contains("at most 16 groups"), "{err}");
        let err = parse(two).unwrap_err();
        assert_eq!(err.line, 5, "{err}");
        assert!(
            err.to_string().contains("line 1 is in group `g` already"),
            "{err}"
        );
    }

    #[test]
    fn the_shipped_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/meshbus.toml");
        let config = ConfigFile::load(&path).unwrap();
        assert!(config.handlers.len() >= 4);
        assert!(config
            .handlers
            .iter()
            .any(|h| matches!(h.action, Action::Http(_))));
    }

    #[test]
    fn what_would_fail_later_is_refused_at_load_with_file_and_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("[[handler]]\nname = \"a\"\npattern = \"x\"\n[handler.log]\n\n[[handler]]\nname = \"a\"\npattern = \"y\"\n[handler.log]\n", 6, "taken by the handler on line 1"),
            ("\n[[handler]]\npattern = \"x\"\nfilter = \".a | [\"\n[handler.log]\n", 2, "jq filter"),
            ("[node]\nname = \"n\"\nmax_event_size = 0\n", 3, "max_event_size 0 is out of range"),
            ("[node]\nlisten = [\"/ip4/0.0.0.0/udp/1/quic-v1\"]\n", 2, "not a TCP address"),
            ("[node]\npeers = [\"not an address\"]\n", 2, "not a multiaddr"),
            ("[[handler]]\npattern = \"x\"\n[handler.exec]\ncommand = [\"/no/such/program\"]\n", 1, "does not exist"),
            ("[[handler]]\npattern = \"x\"\n[handler.exec]\ncommand = \"no-such-program-here --flag\"\n", 1, "not on PATH"),
            ("[[handler]]\npattern = \"x\"\n[handler.exec]\ncommand = \"true\"\ncwd = \"/no/such/dir\"\n", 1, "not a directory"),
            ("[[handler]]\npattern = \"x\"\n[handler.http]\nurl = \"http://\"\n", 1, "is not a URL: empty host"),
            ("[[handler]]\npattern = \"x\"\n[handler.http]\nurl = \"http://h/\"\nheaders = { \"bad name\" = \"v\" }\n", 1, "not a valid HTTP header name"),
            ("[[handler]]\npattern = \"x\"\n[handler.file]\npath = \"/tmp\"\n", 1, "is a directory"),
            ("[[acl]]\npeers = [\"nobody\"]\npublish = [\"a.*\"]\n", 1, "not a peer id"),
        ];
        for (text, line, needle) in cases {
            let err = parse(text).unwrap_err();
            assert_eq!(err.line, *line, "{err}");
            assert!(err.to_string().contains(needle), "{err}");
            assert!(err.to_string().starts_with("meshbus.toml:"), "{err}");
        }
        let err = ConfigFile::load(Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn tokens_from_the_config_carry_their_scope_and_keep_their_secret_in_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("reader.token");
        std::fs::write(&secret, "reader-secret-0123456789\n").unwrap();
        let text = format!(
            "[[token]]\nname = \"dash\"\nsecret_file = \"{p}\"\naccess = \"read\"\n\n[[token]]\nname = \"shop\"\nsecret_file = \"{p}\"\naccess = \"publish\"\npublish = [\"orders.**\"]\n",
            p = secret.display()
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.tokens.len(), 2);
        assert_eq!(c.tokens[0].scope, crate::api::Scope::Read);
        assert_eq!(c.tokens[0].secret(), "reader-secret-0123456789");
        assert!(c.tokens[1].scope.may_publish("orders.created"));
        let err = parse("[[token]]\nname = \"x\"\nsecret_file = \"/no/such\"\naccess = \"read\"\n")
            .unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.to_string().contains("secret_file"), "{err}");
        let err = parse(&text.replace("\"read\"", "\"admin\"")).unwrap_err();
        assert!(
            err.to_string().contains("expected \"read\" or \"publish\""),
            "{err}"
        );
    }

    #[test]
    fn webhook_secrets_stay_out_of_what_is_shown() {
        let c = parse("[[handler]]\npattern = \"x\"\n[handler.http]\nurl = \"https://user:hunter2@hooks.example/in?token=abc&x=1\"\n").unwrap();
        let shown = c.handlers[0].action.to_string();
        assert!(
            !shown.contains("hunter2") && !shown.contains("abc"),
            "{shown}"
        );
        assert!(
            shown.contains("hooks.example") && shown.contains("token="),
            "{shown}"
        );
        let err = "**=https://user:hunter2@/x"
            .parse::<crate::HandlerSpec>()
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = "**=https:x".parse::<crate::HandlerSpec>().unwrap_err();
        assert!(
            err.to_string().contains("not an http:// or https:// URL"),
            "{err}"
        );
    }

    #[test]
    fn rows_read_every_key() {
        let c = parse(
            r#"
[node]
name = "edge"
exec_timeout = "5s"

[[handler]]
name = "ship"
pattern = "orders.*"
type = "order.**"
filter = ".data.amount > 100"
concurrency = 4
retries = 3
backoff = "100ms"
backoff_max = "2s"
dead_letter = "/tmp/dead.jsonl"
[handler.exec]
command = ["cat", "--fast"]
cwd = "/tmp"
timeout = "3s"
"#,
        )
        .unwrap();
        assert_eq!(c.node.name.as_deref(), Some("edge"));
        assert_eq!(c.node.exec_timeout, Some(Duration::from_secs(5)));
        let h = &c.handlers[0];
        assert_eq!(h.name.as_deref(), Some("ship"));
        assert_eq!(h.options.concurrency, 4);
        assert_eq!(h.options.retries, 3);
        assert_eq!(h.options.backoff, Duration::from_millis(100));
        assert_eq!(h.event_type.as_ref().unwrap().as_str(), "order.**");
        let Action::Exec(exec) = &h.action else {
            panic!("exec expected")
        };
        assert_eq!(
            exec.command,
            CommandLine::Argv(vec!["cat".into(), "--fast".into()])
        );
        assert_eq!(exec.timeout, Some(Duration::from_secs(3)));
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let e =
            parse("[[handler]]\npattern = \"a.*\"\n[handler.exec]\ncomand = \"x\"\n").unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.to_string().starts_with("meshbus.toml:4:"), "{e}");
        assert!(e.message.contains("comand"), "{e}");

        let e = parse("[[handler]]\npattern = \"a.*\"\nretries = \"many\"\n[handler.log]\n")
            .unwrap_err();
        assert_eq!(e.line, 3, "{e}");

        let e = parse("\n[[handler]]\npattern = \"**.a\"\n[handler.log]\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("key `pattern`"), "{e}");

        let e = parse("[[handler]]\nname = \"x\"\npattern = \"a\"\n").unwrap_err();
        assert!(
            e.message.contains("handler `x`: needs exactly one action"),
            "{e}"
        );

        let e =
            parse("[[handler]]\npattern = \"a\"\nbackoff = \"soon\"\n[handler.log]\n").unwrap_err();
        assert!(e.message.contains("not a duration"), "{e}");
    }

    #[test]
    fn row_options_have_bounds() {
        let e = parse("[[handler]]\npattern = \"a\"\nqueue = 4611686018427387904\n[handler.log]\n")
            .unwrap_err();
        assert!(e.message.contains("key `queue`"), "{e}");
        let e =
            parse("[[handler]]\npattern = \"a\"\nconcurrency = 0\n[handler.log]\n").unwrap_err();
        assert!(e.message.contains("key `concurrency`"), "{e}");
        let e = parse("[[handler]]\npattern = \"a\"\n[handler.file]\npath = \"x\"\nkeep = 99999\n")
            .unwrap_err();
        assert!(e.message.contains("key `file.keep`"), "{e}");
    }
}
