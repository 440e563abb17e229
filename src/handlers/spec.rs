//! A row of the handler table as configured (`PATTERN=ACTION` on the command line, or a
//! `[[handler]]` in the config file), before it runs.

use super::{Action, ActionError, RowOptions};
use crate::topic::{Pattern, TopicError};

/// One row of the table, as configured: which events, what to do, how.
#[derive(Debug, Clone)]
pub struct HandlerSpec {
    /// Its name in logs and listings; when not given, `h1`, `h2`, … by its place in the
    /// table (`lib1`, `lib2`, … for rows added through the library).
    pub name: Option<String>,
    /// Which topics the row takes.
    pub pattern: Pattern,
    /// Which event types it takes (same `*`/`**` syntax); all when `None`.
    pub event_type: Option<Pattern>,
    /// A jq expression over the event's CloudEvents JSON; the row takes the event only when
    /// it yields `true` (any other output, or none, skips it).
    pub filter: Option<String>,
    /// A jq expression whose output the action gets instead of the event's JSON.
    pub transform: Option<String>,
    /// Concurrency, queue, retries, dead letters.
    pub options: RowOptions,
    /// A handler group: among the live peers with a row in it, each event this row matches
    /// is handled by one of them ([`crate::proto::groups`]).
    pub group: Option<String>,
    /// A jq expression giving a group row's ownership key; the event id when `None`.
    pub key: Option<String>,
    /// The row answers queries: its action's output goes back to the asker.
    pub reply: bool,
    /// What it does.
    pub action: Action,
}

impl HandlerSpec {
    /// A row with default options.
    pub fn new(pattern: Pattern, action: Action) -> Self {
        Self {
            name: None,
            pattern,
            event_type: None,
            filter: None,
            transform: None,
            options: RowOptions::default(),
            group: None,
            key: None,
            reply: false,
            action,
        }
    }

    /// Checks the group, key and reply settings (what a config load and a table build do).
    pub fn check_group(&self) -> Result<(), String> {
        if let Some(group) = &self.group {
            crate::proto::groups::check_name(group).map_err(|e| format!("key `group`: {e}"))?;
            if self.pattern.as_str().starts_with("_mesh") {
                return Err(format!(
                    "key `group`: `{}` matches this peer's own `_mesh.` events, which no other member sees",
                    self.pattern
                ));
            }
        }
        if let Some(key) = &self.key {
            if self.group.is_none() {
                return Err("key `key`: only a row with a `group` has a key".into());
            }
            super::jq::check_key(key).map_err(|e| format!("key `key`: {e}"))?;
        }
        if self.reply && !self.action.answers() {
            return Err(format!(
                "key `reply`: a {} row has no output to answer with; use exec, http or Rust",
                self.action
            ));
        }
        Ok(())
    }
}

/// Why a `PATTERN=ACTION` row was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// No `=`.
    #[error("handler `{0}` has no `=`; expected PATTERN=ACTION, e.g. `orders.*=log`")]
    NoEquals(String),
    /// The pattern part is not a pattern.
    #[error("handler `{spec}`: {source}")]
    Pattern {
        /// The whole row.
        spec: String,
        /// What is wrong with the pattern.
        source: TopicError,
    },
    /// The action part is not an action.
    #[error("handler `{spec}`: {source}")]
    Action {
        /// The whole row.
        spec: String,
        /// What is wrong with the action.
        source: ActionError,
    },
    /// The action would fail on every event.
    #[error("handler `{spec}`: {reason}")]
    Check {
        /// The whole row.
        spec: String,
        /// What is wrong.
        reason: String,
    },
}

/// A `--on` row as it may be shown: a webhook URL's secrets hidden.
fn shown(spec: &str) -> String {
    match spec.split_once('=') {
        Some((pattern, action)) if action.to_ascii_lowercase().starts_with("http") => {
            let redacted = super::action::redact_url(action);
            if redacted == "<not a URL>" {
                format!("{pattern}=http…")
            } else {
                format!("{pattern}={redacted}")
            }
        }
        _ => spec.to_owned(),
    }
}

impl std::str::FromStr for HandlerSpec {
    type Err = SpecError;
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let shown = shown(spec);
        let (pattern, action) = spec
            .split_once('=')
            .ok_or_else(|| SpecError::NoEquals(shown.clone()))?;
        let pattern = Pattern::new(pattern).map_err(|source| SpecError::Pattern {
            spec: shown.clone(),
            source,
        })?;
        let action: Action = action.parse().map_err(|source| SpecError::Action {
            spec: shown.clone(),
            source,
        })?;
        action.check().map_err(|reason| SpecError::Check {
            spec: shown,
            reason,
        })?;
        Ok(Self::new(pattern, action))
    }
}
