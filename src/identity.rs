//! A peer's lasting identity: its key, kept in a data directory, so a restarted peer comes
//! back with the same peer id.
//!
//! The directory holds `identity.key` (the libp2p protobuf encoding of an ed25519 keypair,
//! mode 0600) and `lock`, held with `flock` while a peer runs: two peers sharing one identity
//! would confuse the whole mesh, so the second is refused with a clear message.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use nix::fcntl::{Flock, FlockArg};

/// File name of the key inside the data directory.
pub const KEY_FILE: &str = "identity.key";

/// Largest key file read (an ed25519 key takes 68 bytes).
const MAX_KEY_FILE: usize = 4096;

/// Why the identity could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// No directory given and none can be derived from the environment.
    #[error("no data directory: set --data-dir, or HOME or XDG_DATA_HOME")]
    NoDefault,
    /// File system trouble.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The key file is not a key.
    #[error("{path} is not a meshbus identity key ({reason}); move it away to get a new identity")]
    BadKey {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another running peer uses this directory.
    #[error(
        "data directory {0} is in use by another running peer; give this one its own --data-dir"
    )]
    InUse(PathBuf),
}

/// A loaded identity and the lock that keeps it ours while the peer runs.
#[derive(Debug)]
pub struct Identity {
    /// The key.
    pub keypair: Keypair,
    /// The data directory it lives in, for messages.
    pub dir: PathBuf,
    /// Held until dropped.
    _lock: Flock<File>,
}

/// `$XDG_DATA_HOME/meshbus`, else `$HOME/.local/share/meshbus`.
pub fn default_data_dir() -> Result<PathBuf, IdentityError> {
    let non_empty = |v: std::ffi::OsString| (!v.is_empty()).then(|| PathBuf::from(v));
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").and_then(non_empty) {
        return Ok(xdg.join("meshbus"));
    }
    std::env::var_os("HOME")
        .and_then(non_empty)
        .map(|home| home.join(".local/share/meshbus"))
        .ok_or(IdentityError::NoDefault)
}

/// Loads the key in `dir`, creating the directory and a new key the first time.
pub fn load_or_create(dir: &Path) -> Result<Identity, IdentityError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| IdentityError::Io { path, source }
    };
    if !dir.exists() {
        // The directory holds the keys, the API token and every event: its owner's alone.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    } else if let Ok(meta) = fs::metadata(dir) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %dir.display(), mode = format!("{mode:o}"),
                "the data directory is open to other users; its event log is readable by them (chmod 700 it)");
        }
    }
    let lock_path = dir.join("lock");
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
        .map_err(|_| IdentityError::InUse(dir.to_owned()))?;

    let key_path = dir.join(KEY_FILE);
    let keypair = match crate::files::read_limited(&key_path, MAX_KEY_FILE) {
        Ok(bytes) => {
            let keypair =
                Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::BadKey {
                    path: key_path.clone(),
                    reason: e.to_string(),
                })?;
            let mode = fs::metadata(&key_path)
                .map_err(io(&key_path))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %key_path.display(), mode = format!("{mode:o}"), "identity key is readable by others");
            }
            keypair
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair
                .to_protobuf_encoding()
                .map_err(|e| IdentityError::BadKey {
                    path: key_path.clone(),
                    reason: e.to_string(),
                })?;
            // Write then rename, so a crash never leaves half a key behind.
            let tmp = dir.join(format!("{KEY_FILE}.tmp"));
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?;
            file.write_all(&bytes).map_err(io(&tmp))?;
            file.sync_all().map_err(io(&tmp))?;
            fs::rename(&tmp, &key_path).map_err(io(&key_path))?;
            keypair
        }
        Err(e) => return Err(io(&key_path)(e)),
    };
    Ok(Identity {
        keypair,
        dir: dir.to_owned(),
        _lock: lock,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_directory_gives_the_same_peer_id() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        let id = first.keypair.public().to_peer_id();
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(first);
        let fresh = dir.path().join("new");
        let _made = load_or_create(&fresh).unwrap();
        let mode = fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o700,
            "a data dir it makes is its owner's alone"
        );
        let again = load_or_create(dir.path()).unwrap();
        assert_eq!(again.keypair.public().to_peer_id(), id);
    }

    #[test]
    fn a_directory_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _held = load_or_create(dir.path()).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("in use by another running peer"),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_key_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEY_FILE), b"not a key").unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("is not a meshbus identity key"),
            "{err}"
        );
        assert_eq!(fs::read(dir.path().join(KEY_FILE)).unwrap(), b"not a key");
    }
}
