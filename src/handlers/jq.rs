//! jq filters and transforms on events, with jaq (a Rust jq implementation).
//!
//! A row's `filter` decides whether it takes an event: the event's CloudEvents JSON goes in,
//! and the row takes the event when the first output is `true`. A `transform` shapes what the
//! action gets: its first output, as JSON. A filter that fails on an event (a type error, say)
//! is a failure of that row for that event, never a crash. Compiled filters are shared by the
//! row's workers; each run finishes inside one call.

use jaq_core::compile::Undefined;
use jaq_core::data::JustLut;
use jaq_core::load::{self, Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Exn, Vars};
use jaq_json::{Num, Val};
use serde_json::Value;

use crate::event::Event;

type D = JustLut<Val>;
type JqFilter = jaq_core::Filter<D>;

/// A jq expression that does not compile.
#[derive(Debug, thiserror::Error)]
#[error("jq {which} `{code}`: {message}")]
pub struct JqError {
    /// `filter` or `transform`.
    pub which: &'static str,
    /// The expression.
    pub code: String,
    /// Where and what.
    pub message: String,
}

/// A row's compiled filter and transform.
pub(super) struct RowJq {
    filter: Option<JqFilter>,
    transform: Option<JqFilter>,
}

impl RowJq {
    /// Compiles what the row has; `None` when it has neither.
    pub(super) fn compile(
        filter: Option<&str>,
        transform: Option<&str>,
    ) -> Result<Option<RowJq>, JqError> {
        let one = |which: &'static str, code: Option<&str>| {
            code.map(|code| {
                compile(code).map_err(|message| JqError {
                    which,
                    code: code.to_owned(),
                    message,
                })
            })
            .transpose()
        };
        let filter = one("filter", filter)?;
        let transform = one("transform", transform)?;
        Ok((filter.is_some() || transform.is_some()).then_some(RowJq { filter, transform }))
    }

    /// `Ok(None)`: the filter skips the event. `Ok(Some(json))`: what the action gets.
    pub(super) fn apply(&self, event: &Event) -> Result<Option<String>, String> {
        let line = event.to_json_line();
        let input: Value = serde_json::from_str(&line).map_err(|e| format!("event JSON: {e}"))?;
        if let Some(filter) = &self.filter {
            match first(filter, input.clone())? {
                Some(Value::Bool(true)) => {}
                _ => return Ok(None),
            }
        }
        let Some(transform) = &self.transform else {
            return Ok(Some(line));
        };
        Ok(first(transform, input)?.map(|v| v.to_string()))
    }
}

/// A group row's key expression: which events go to the same member.
pub(super) struct KeyJq(JqFilter);

impl KeyJq {
    pub(super) fn compile(code: &str) -> Result<KeyJq, JqError> {
        let error = |message: String| JqError {
            which: "key",
            code: code.to_owned(),
            message,
        };
        // Every member must compute the same key for an event, or the group's views split.
        if let Some(word) = varying_word(code) {
            return Err(error(format!(
                "`{word}` gives different results on different peers; a key must depend on the event alone"
            )));
        }
        compile(code).map(KeyJq).map_err(error)
    }

    /// The key of `event`: a string's own bytes, any other value's JSON. No output, or
    /// `null`, is an error: an event without a key cannot be placed.
    pub(super) fn apply(&self, event: &Event) -> Result<Vec<u8>, String> {
        let input: Value =
            serde_json::from_str(&event.to_json_line()).map_err(|e| format!("event JSON: {e}"))?;
        match first(&self.0, input)? {
            None | Some(Value::Null) => Err("jq key: no key (null or no output)".into()),
            Some(Value::String(s)) => Ok(s.into_bytes()),
            Some(other) => Ok(other.to_string().into_bytes()),
        }
    }
}

/// Builtins whose output depends on the peer or the moment, not the event.
const VARYING: [&str; 8] = [
    "now",
    "env",
    "$ENV",
    "input",
    "inputs",
    "localtime",
    "strflocaltime",
    "$__loc__",
];

/// The first word of `code` that makes it vary between peers: words in code and in string
/// interpolations `\(…)`, not in string text, and not field names (`.now`).
fn varying_word(code: &str) -> Option<&'static str> {
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    // Nesting: each entry is whether that level is a string (true) or code (false); inside
    // code, the parentheses opened since an interpolation began.
    let mut modes: Vec<(bool, usize)> = vec![(false, 0)];
    let mut escaped = false;
    let mut after_dot = false;
    for c in code.chars().chain(std::iter::once(' ')) {
        let Some(&(in_string, _)) = modes.last() else {
            break;
        };
        if in_string {
            match (escaped, c) {
                (true, '(') => {
                    escaped = false;
                    modes.push((false, 0));
                }
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    modes.pop();
                }
                _ => {}
            }
            continue;
        }
        if c.is_alphanumeric() || c == '_' || c == '$' {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            let w = std::mem::take(&mut word);
            if !after_dot {
                words.push(w);
            }
        }
        after_dot = c == '.';
        match c {
            '"' => modes.push((true, 0)),
            '(' => {
                if let Some(top) = modes.last_mut() {
                    top.1 += 1;
                }
            }
            ')' => {
                let depth = modes.len();
                match modes.last_mut() {
                    Some((false, 0)) if depth > 1 => {
                        modes.pop(); // the end of an interpolation: back in its string
                    }
                    Some((_, open)) => *open = open.saturating_sub(1),
                    None => {}
                }
            }
            _ => {}
        }
    }
    VARYING.into_iter().find(|v| words.iter().any(|w| w == v))
}

/// Checks that a group row's key expression compiles.
pub fn check_key(code: &str) -> Result<(), JqError> {
    KeyJq::compile(code).map(|_| ())
}

/// Checks that a row's filter and transform compile (what a config load does before it
/// accepts the row).
pub fn check(filter: Option<&str>, transform: Option<&str>) -> Result<(), JqError> {
    RowJq::compile(filter, transform).map(|_| ())
}

/// The first output of `filter` on `input`, or its error.
fn first(filter: &JqFilter, input: Value) -> Result<Option<Value>, String> {
    let input: Val = serde_json::from_value(input).map_err(|e| format!("jq input: {e}"))?;
    let ctx = Ctx::<D>::new(&filter.lut, Vars::new([]));
    let mut outputs = filter.id.run((ctx, input));
    match outputs.next() {
        None => Ok(None),
        Some(Ok(v)) => Ok(Some(val_to_json(&v))),
        Some(Err(e)) => Err(format!("jq: {}", exn_to_string(e))),
    }
}

/// Deepest nesting of brackets and parentheses a jq expression may have. jaq's parser
/// recurses once per level; this keeps a hostile config or reload far from the stack's end.
pub const MAX_NESTING: usize = 64;

/// Longest jq expression accepted.
pub const MAX_CODE: usize = 16 * 1024;

/// Stack of the thread that compiles: deep enough for any expression within the bounds
/// above, however it nests (`if`, `reduce`, unary minus), so a compile never kills the peer.
const COMPILE_STACK: usize = 64 << 20;

/// How deeply `code` nests `(`, `[` and `{` outside string literals.
fn nesting(code: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0, false, false);
    for c in code.chars() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => in_string = false,
            (true, false, _) => {}
            (false, _, '"') => in_string = true,
            (false, _, '(' | '[' | '{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, _, ')' | ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// jq's `fromjson` with serde_json's nesting limit (128 levels): jaq's own parser recurses
/// without bound, so a string of 10,000 `[` in an event from the network would overflow the
/// stack of whichever thread ran the filter.
fn fromjson(cv: jaq_core::Cv<'_, D>) -> jaq_core::ValXs<'_, Val> {
    let parsed = match &cv.1 {
        Val::TStr(s) | Val::BStr(s) => serde_json::from_slice::<Val>(s)
            .map_err(|e| jaq_json::Error::str(format_args!("fromjson: {e}"))),
        other => Err(jaq_json::Error::str(format_args!(
            "fromjson: {other} is not a string"
        ))),
    };
    jaq_core::native::bome(parsed)
}

/// Parses and compiles `code` with the jq standard library, after checking its size and
/// nesting, on a thread with a deep stack.
fn compile(code: &str) -> Result<JqFilter, String> {
    if code.len() > MAX_CODE {
        return Err(format!("longer than {MAX_CODE} bytes"));
    }
    let deepest = nesting(code);
    if deepest > MAX_NESTING {
        return Err(format!(
            "nests {deepest} levels deep; at most {MAX_NESTING}"
        ));
    }
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("meshbus-jq".into())
            .stack_size(COMPILE_STACK)
            .spawn_scoped(scope, || compile_here(code))
            .map_err(|e| format!("cannot start the jq compiler: {e}"))?
            .join()
            .map_err(|_| "the jq compiler failed".to_owned())?
    })
}

fn compile_here(code: &str) -> Result<JqFilter, String> {
    let defs = jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs());
    let ours = jaq_core::native::run::<D>(("fromjson", jaq_core::native::v(0), fromjson));
    let funs = jaq_core::funs::<D>()
        .chain(jaq_std::funs::<D>())
        .chain(
            jaq_json::funs::<D>()
                .filter(|(name, args, _)| !(*name == "fromjson" && args.is_empty())),
        )
        .chain([ours]);
    let arena = Arena::default();
    let modules = Loader::new(defs)
        .load(&arena, File { code, path: () })
        .map_err(load_errors)?;
    Compiler::default()
        .with_funs(funs)
        .compile(modules)
        .map_err(compile_errors)
}

// Halting filters (`halt`, `halt_error`) become errors here: jaq's own helper would exit the
// whole process.
/// Do NOT use `jaq_core::unwrap_valr` in a server: on `halt` it calls `std::process::exit`.
fn exn_to_string(e: Exn<'_, Val>) -> String {
    match e.get_err() {
        // `error("msg")` -> msg ; `error({..})` -> JSON text ; type errors -> message
        Ok(err) => match err.into_val() {
            Val::TStr(s) => String::from_utf8_lossy(&s).into_owned(),
            v => v.to_string(),
        },
        Err(e) => match e.get_halt() {
            Ok(code) => format!("filter called halt (exit code {code})"),
            Err(_) => "internal jaq exception".to_string(),
        },
    }
}

fn val_to_json(v: &Val) -> Value {
    match v {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Bool(*b),
        Val::Num(n) => num_to_json(n),
        Val::TStr(s) | Val::BStr(s) => Value::String(String::from_utf8_lossy(s).into_owned()),
        Val::Arr(a) => Value::Array(a.iter().map(val_to_json).collect()),
        Val::Obj(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (key_string(k), val_to_json(v)))
                .collect(),
        ),
    }
}

fn key_string(k: &Val) -> String {
    match k {
        Val::TStr(s) => String::from_utf8_lossy(s).into_owned(),
        other => other.to_string(), // jaq allows non-string keys, e.g. `{(1): 2}`
    }
}

fn num_to_json(n: &Num) -> Value {
    let f = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    match n {
        Num::Int(i) => Value::from(*i as i64),
        Num::Float(x) => f(*x), // NaN / ±Infinity -> null
        Num::BigInt(_) | Num::Dec(_) => {
            let s = n.to_string();
            s.parse::<serde_json::Number>()
                .map(Value::Number)
                .or_else(|_| s.parse::<f64>().map(f))
                .unwrap_or(Value::Null)
        }
    }
}

fn load_errors(errs: load::Errors<&str, ()>) -> String {
    let mut out = Vec::new();
    for (file, err) in errs {
        match err {
            load::Error::Io(es) => {
                for (path, msg) in es {
                    out.push(format!("cannot load module {path:?}: {msg}"));
                }
            }
            load::Error::Lex(es) => {
                for (expected, found) in es {
                    let at = pos(file.code, found);
                    out.push(format!("{at}: lex error: expected {}", expected.as_str()));
                }
            }
            load::Error::Parse(es) => {
                for (expected, found) in es {
                    let at = pos(file.code, found);
                    let found = if found.is_empty() {
                        "end of input"
                    } else {
                        found
                    };
                    out.push(format!(
                        "{at}: parse error: expected {}, found {found}",
                        expected.as_str()
                    ));
                }
            }
        }
    }
    out.join("\n")
}

fn compile_errors(errs: jaq_core::compile::Errors<&str, ()>) -> String {
    let mut out = Vec::new();
    for (file, es) in errs {
        for (name, undef) in es {
            let what = match undef {
                Undefined::Filter(arity) => format!("filter {name}/{arity}"),
                other => format!("{} {name}", other.as_str()),
            };
            out.push(format!("{}: undefined {what}", pos(file.code, name)));
        }
    }
    out.join("\n")
}

/// Line/column of `part` (a subslice of `code`); jaq errors carry subslices of the source.
fn pos(code: &str, part: &str) -> String {
    let (start, p) = (code.as_ptr() as usize, part.as_ptr() as usize);
    let before = p
        .checked_sub(start)
        .and_then(|off| code.get(..off))
        .filter(|_| p <= start + code.len());
    match before {
        Some(b) => {
            let line = b.matches('\n').count() + 1;
            let col = b.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {col}")
        }
        None => "<prelude>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventId, JSON};
    use crate::topic::Topic;

    fn event(data: &str) -> Event {
        Event {
            id: EventId::new(),
            topic: Topic::new("orders.created").unwrap(),
            event_type: "orders.created".into(),
            source: libp2p::PeerId::random(),
            seq: 1,
            epoch: 1,
            time: std::time::SystemTime::now(),
            content_type: JSON.into(),
            data: bytes::Bytes::copy_from_slice(data.as_bytes()),
        }
    }

    #[test]
    fn filters_keep_skip_and_fail() {
        let jq = RowJq::compile(Some(".data.amount > 100"), None)
            .unwrap()
            .unwrap();
        assert!(jq.apply(&event(r#"{"amount":150}"#)).unwrap().is_some());
        assert!(jq.apply(&event(r#"{"amount":50}"#)).unwrap().is_none());
        let jq = RowJq::compile(Some(".data.amount | ascii_downcase"), None)
            .unwrap()
            .unwrap();
        assert!(
            jq.apply(&event(r#"{"amount":5}"#)).is_err(),
            "a type error is an error"
        );
    }

    #[test]
    fn hostile_nesting_is_an_error_not_a_crash() {
        // In an event from the network: 10,000 `[` inside a string, parsed by `fromjson`.
        let jq = RowJq::compile(Some(".data | fromjson | length > 0"), None)
            .unwrap()
            .unwrap();
        let deep = serde_json::to_string(&"[".repeat(10_000)).unwrap();
        let err = jq.apply(&event(&deep)).unwrap_err();
        assert!(
            err.contains("fromjson") && err.contains("recursion"),
            "{err}"
        );
        // Well-formed JSON still parses.
        let ok = serde_json::to_string(&"[1,[2]]").unwrap();
        assert!(jq.apply(&event(&ok)).unwrap().is_some());
        // In a config: 3,000 nested brackets, and deep keyword nesting within the size bound.
        let code = format!("{}1{}", "[".repeat(3000), "]".repeat(3000));
        let err = RowJq::compile(Some(&code), None).err().unwrap();
        assert!(err.message.contains("nests 3000 levels"), "{}", err.message);
        let ifs = format!(
            "{}1{}",
            "if true then ".repeat(1000),
            " else 0 end".repeat(1000)
        );
        let _ = RowJq::compile(None, Some(&ifs)); // compiles or not, but returns
        assert_eq!(
            nesting(r#"{"a": "((("}"#),
            1,
            "brackets in strings do not count"
        );
    }

    #[test]
    fn transforms_shape_what_the_action_gets() {
        let jq = RowJq::compile(None, Some("{id: .data.id, topic}"))
            .unwrap()
            .unwrap();
        let out = jq.apply(&event(r#"{"id":42,"x":1}"#)).unwrap().unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v, serde_json::json!({"id": 42, "topic": "orders.created"}));
    }

    #[test]
    fn keys_that_vary_between_peers_are_refused() {
        for code in [
            "now",
            ".data.a + now",
            "env.HOME",
            "$ENV.X",
            "input",
            "[inputs]",
            r#""\(.id)-\(now)""#,
            r#""a\("b\(env.X)")""#,
        ] {
            let err = check_key(code).unwrap_err().to_string();
            assert!(
                err.contains("different results on different peers"),
                "{code}: {err}"
            );
        }
        for code in [
            ".data.customer",
            "\"now\" + .id",
            ".data.environment",
            ".data.nowhere",
            ".data.now",
            ".data | .env",
            r#""\(.id) now""#,
        ] {
            assert!(check_key(code).is_ok(), "{code}");
        }
    }

    #[test]
    fn bad_expressions_are_refused_with_where() {
        let e = RowJq::compile(Some(".data | nosuchfn"), None)
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("undefined") && e.to_string().contains("nosuchfn"),
            "{e}"
        );
        let e = RowJq::compile(None, Some("{a: ")).err().unwrap();
        assert!(e.to_string().contains("transform"), "{e}");
        assert!(RowJq::compile(None, None).unwrap().is_none());
        let jq = RowJq::compile(Some("halt_error"), None).unwrap().unwrap();
        assert!(
            jq.apply(&event("1")).is_err(),
            "halting is an error, not an exit"
        );
    }
}
