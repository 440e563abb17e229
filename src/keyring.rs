//! The mesh's keys: the shared secret a peer must hold to connect at all.
//!
//! A peer's data directory keeps them in `mesh.keys` (mode 0600). The first key is the
//! *primary*: this peer encrypts the connections it opens with it. Every key in the file is
//! accepted on the connections others open, which is what lets a mesh change its key without
//! downtime, as Serf's keyring does: install the new key everywhere, make it primary
//! everywhere, then remove the old one. How the keys guard a connection is in
//! [`crate::node::private`].
//!
//! `meshbus invite` prints the primary key as one line ([`MeshKey::invite`]) and `meshbus
//! join LINE` stores it; both work on the data directory alone. A running peer notices the
//! file change on its next connection ([`LiveKeyring`]), so `meshbus keys …` needs no
//! restart.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;
use salsa20::cipher::{KeyIvInit as _, StreamCipher as _};
use salsa20::XSalsa20;

use crate::files;

/// File name of the keyring inside the data directory.
pub const KEYS_FILE: &str = "mesh.keys";

/// Bytes in a key (XSalsa20's key size).
pub const KEY_BYTES: usize = 32;

/// Most keys a keyring holds: a rotation needs two; more only slows every incoming handshake.
pub const MAX_KEYS: usize = 8;

/// What an invitation line starts with.
pub const INVITE_PREFIX: &str = "meshbus-invite-1:";

/// Largest keyring file read.
const MAX_FILE: usize = 16 * 1024;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Why a key or keyring was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// File system trouble.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a keyring.
    #[error("{path} is not a meshbus keyring: {reason}")]
    BadFile {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A key that does not parse.
    #[error("not a mesh key ({0}); a key is 43 characters of URL-safe base64, as `meshbus keys generate` prints")]
    BadKey(String),
    /// An invitation that does not parse.
    #[error("not an invitation: it should be one line starting with {INVITE_PREFIX}, as `meshbus invite` prints")]
    BadInvite,
    /// No key in the keyring matches.
    #[error("no key {0} in this keyring (`meshbus keys list` shows the fingerprints)")]
    Unknown(String),
    /// The primary key cannot be removed.
    #[error("key {0} is the primary key; make another key primary first (`meshbus keys use`)")]
    RemovePrimary(String),
    /// The keyring is full.
    #[error("the keyring already holds {MAX_KEYS} keys; remove one first")]
    Full,
}

/// One mesh key. Its `Debug` and `Display` show only the fingerprint, never the key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MeshKey([u8; KEY_BYTES]);

impl MeshKey {
    /// A new random key.
    pub fn generate() -> MeshKey {
        let mut bytes = [0u8; KEY_BYTES];
        getrandom::fill(&mut bytes).expect("the OS random source works");
        MeshKey(bytes)
    }

    /// The key bytes, for the cipher.
    pub fn bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    /// The key as text (the secret itself): what `keys install` takes.
    pub fn encode(&self) -> String {
        B64.encode(self.0)
    }

    /// Parses [`MeshKey::encode`]'s text.
    pub fn parse(text: &str) -> Result<MeshKey, KeyringError> {
        let bytes = B64
            .decode(text.trim())
            .map_err(|e| KeyringError::BadKey(e.to_string()))?;
        let bytes: [u8; KEY_BYTES] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| KeyringError::BadKey(format!("{} bytes, not 32", b.len())))?;
        Ok(MeshKey(bytes))
    }

    /// A short name for the key that does not give it away: 16 hex digits of XSalsa20's
    /// keystream under the key with a fixed nonce.
    pub fn fingerprint(&self) -> String {
        let mut out = [0u8; 8];
        let mut cipher = XSalsa20::new(&self.0.into(), b"meshbus key fingerprint!".into());
        cipher.apply_keystream(&mut out);
        out.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The one-line invitation `meshbus join` takes.
    pub fn invite(&self) -> String {
        format!("{INVITE_PREFIX}{}", self.encode())
    }

    /// Parses [`MeshKey::invite`]'s line.
    pub fn from_invite(line: &str) -> Result<MeshKey, KeyringError> {
        let key = line
            .trim()
            .strip_prefix(INVITE_PREFIX)
            .ok_or(KeyringError::BadInvite)?;
        MeshKey::parse(key)
    }
}

impl std::fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshKey({})", self.fingerprint())
    }
}

impl std::fmt::Display for MeshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// A peer's keys, primary first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<MeshKey>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    keys: Vec<String>,
}

const FILE_HEADER: &str = "\
# meshbus mesh keys. Whoever holds one of these can join the mesh: keep this file private.
# The first key is primary (this peer dials with it); every key here is accepted.
";

impl Keyring {
    /// A keyring holding only `primary`.
    pub fn new(primary: MeshKey) -> Keyring {
        Keyring {
            keys: vec![primary],
        }
    }

    /// The key this peer dials with.
    pub fn primary(&self) -> MeshKey {
        self.keys[0]
    }

    /// Every key accepted, primary first.
    pub fn keys(&self) -> &[MeshKey] {
        &self.keys
    }

    /// The key `which` names: the key itself or (a prefix of at least 8 digits of) its
    /// fingerprint.
    pub fn find(&self, which: &str) -> Result<MeshKey, KeyringError> {
        let which = which.trim();
        let found = match MeshKey::parse(which) {
            Ok(key) => self.keys.iter().find(|k| **k == key),
            Err(_) if which.len() >= 8 => self
                .keys
                .iter()
                .find(|k| k.fingerprint().starts_with(&which.to_ascii_lowercase())),
            Err(_) => None,
        };
        found.copied().ok_or_else(|| {
            // A fingerprint may be shown; what might be a key is not.
            let shown = if which.len() <= 16 && which.bytes().all(|b| b.is_ascii_hexdigit()) {
                which.to_owned()
            } else {
                "given".to_owned()
            };
            KeyringError::Unknown(shown)
        })
    }

    /// Adds `key` as a secondary key (accepted, not dialled with); `false` if it was there.
    pub fn install(&mut self, key: MeshKey) -> Result<bool, KeyringError> {
        if self.keys.contains(&key) {
            return Ok(false);
        }
        if self.keys.len() >= MAX_KEYS {
            return Err(KeyringError::Full);
        }
        self.keys.push(key);
        Ok(true)
    }

    /// Makes the key `which` names primary.
    pub fn make_primary(&mut self, which: &str) -> Result<MeshKey, KeyringError> {
        let key = self.find(which)?;
        self.keys.retain(|k| *k != key);
        self.keys.insert(0, key);
        Ok(key)
    }

    /// Removes the key `which` names; never the primary one.
    pub fn remove(&mut self, which: &str) -> Result<MeshKey, KeyringError> {
        let key = self.find(which)?;
        if key == self.primary() {
            return Err(KeyringError::RemovePrimary(key.fingerprint()));
        }
        self.keys.retain(|k| *k != key);
        Ok(key)
    }

    /// The file's text.
    pub fn to_file(&self) -> String {
        let file = KeyringFile {
            keys: self.keys.iter().map(MeshKey::encode).collect(),
        };
        let body = toml::to_string(&file).expect("a list of strings is TOML");
        format!("{FILE_HEADER}{body}")
    }

    /// Parses [`Keyring::to_file`]'s text; `path` is for messages.
    pub fn from_file(text: &str, path: &Path) -> Result<Keyring, KeyringError> {
        let bad = |reason: String| KeyringError::BadFile {
            path: path.to_owned(),
            reason,
        };
        // The message only: toml's full error quotes the line, and the line is a key.
        let file: KeyringFile = toml::from_str(text).map_err(|e| bad(e.message().to_owned()))?;
        if file.keys.is_empty() {
            return Err(bad("it holds no key".into()));
        }
        if file.keys.len() > MAX_KEYS {
            return Err(bad(format!("more than {MAX_KEYS} keys")));
        }
        let mut keys = Vec::with_capacity(file.keys.len());
        for (i, text) in file.keys.iter().enumerate() {
            let key = MeshKey::parse(text).map_err(|e| bad(format!("key {}: {e}", i + 1)))?;
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        Ok(Keyring { keys })
    }

    /// The keyring in `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Keyring>, KeyringError> {
        let path = dir.join(KEYS_FILE);
        match files::read_text_limited(&path, MAX_FILE) {
            Ok(text) => Keyring::from_file(&text, &path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(KeyringError::Io { path, source }),
        }
    }

    /// The keyring in `dir`, or a new one with a new key written there; `true` when new.
    pub fn load_or_create(dir: &Path) -> Result<(Keyring, bool), KeyringError> {
        if let Some(ring) = Keyring::load(dir)? {
            return Ok((ring, false));
        }
        let ring = Keyring::new(MeshKey::generate());
        ring.save(dir)?;
        Ok((ring, true))
    }

    /// Writes the keyring to `dir` (mode 0600, whole or not at all).
    pub fn save(&self, dir: &Path) -> Result<(), KeyringError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| KeyringError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(KEYS_FILE);
        files::write_private(&path, self.to_file().as_bytes()).map_err(io(&path))
    }
}

/// The keyring a running peer checks connections against. One loaded from a data directory
/// is read again when its file changes (another inode, size or modification time), so the
/// `meshbus keys` commands take effect on the next connection; a file that no longer parses
/// keeps the keys in force and is logged.
#[derive(Debug)]
pub struct LiveKeyring {
    path: Option<PathBuf>,
    state: Mutex<(Option<Stamp>, Keyring)>,
}

type Stamp = (u64, i64, i64, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}

impl LiveKeyring {
    /// Keys fixed for the peer's lifetime.
    pub fn fixed(ring: Keyring) -> LiveKeyring {
        LiveKeyring {
            path: None,
            state: Mutex::new((None, ring)),
        }
    }

    /// Keys from `dir`'s keyring file, `ring` being what it holds now.
    pub fn watching(dir: &Path, ring: Keyring) -> LiveKeyring {
        let path = dir.join(KEYS_FILE);
        LiveKeyring {
            state: Mutex::new((stamp(&path), ring)),
            path: Some(path),
        }
    }

    /// The keys in force now.
    pub fn current(&self) -> Keyring {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = &self.path {
            let now = stamp(path);
            if now != state.0 {
                state.0 = now;
                let reread = files::read_text_limited(path, MAX_FILE)
                    .map_err(|source| KeyringError::Io {
                        path: path.clone(),
                        source,
                    })
                    .and_then(|text| Keyring::from_file(&text, path));
                match reread {
                    Ok(ring) => {
                        if ring != state.1 {
                            tracing::info!(primary = %ring.primary(), keys = ring.keys().len(), "mesh keys changed");
                        }
                        state.1 = ring;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "mesh keys file changed but cannot be used; keeping the keys in force")
                    }
                }
            }
        }
        state.1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_invitations_round_trip_and_show_no_secret() {
        let key = MeshKey::generate();
        assert_eq!(MeshKey::parse(&key.encode()).unwrap(), key);
        assert_eq!(MeshKey::from_invite(&key.invite()).unwrap(), key);
        assert!(!format!("{key:?} {key}").contains(&key.encode()));
        assert_eq!(key.fingerprint().len(), 16);
        assert!(MeshKey::parse("short").is_err());
        let err = MeshKey::from_invite(&key.encode()).unwrap_err();
        assert!(err.to_string().contains(INVITE_PREFIX), "{err}");
    }

    #[test]
    fn rotation_installs_promotes_and_removes_but_never_the_primary() {
        let (old, new) = (MeshKey::generate(), MeshKey::generate());
        let mut ring = Keyring::new(old);
        assert!(ring.install(new).unwrap());
        assert!(!ring.install(new).unwrap());
        assert_eq!(ring.primary(), old);
        let err = ring.remove(&old.fingerprint()).unwrap_err();
        assert!(matches!(err, KeyringError::RemovePrimary(_)), "{err}");
        ring.make_primary(&new.fingerprint()[..8]).unwrap();
        assert_eq!(ring.primary(), new);
        ring.remove(&old.encode()).unwrap();
        assert_eq!(ring.keys(), &[new]);
        assert!(matches!(
            ring.find("0123456789abcdef"),
            Err(KeyringError::Unknown(_))
        ));
    }

    #[test]
    fn the_file_is_private_and_a_running_peer_sees_changes() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (ring, created) = Keyring::load_or_create(dir.path()).unwrap();
        assert!(created);
        let mode = std::fs::metadata(dir.path().join(KEYS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let live = LiveKeyring::watching(dir.path(), ring.clone());
        let mut changed = ring.clone();
        let new = MeshKey::generate();
        changed.install(new).unwrap();
        changed.make_primary(&new.encode()).unwrap();
        changed.save(dir.path()).unwrap();
        assert_eq!(live.current().primary(), new);
        // A broken file keeps the keys in force.
        std::fs::write(dir.path().join(KEYS_FILE), "keys = 3").unwrap();
        assert_eq!(live.current().primary(), new);
        // ...and is refused at the next start, never replaced.
        let err = Keyring::load_or_create(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("is not a meshbus keyring"),
            "{err}"
        );
    }
}
