//! Reading and writing the small files a peer keeps: bounded reads (a path that turns out to
//! be `/dev/zero`, or a link to it, is refused rather than read until memory runs out) and
//! private files written whole (mode 0600, write then rename, so a crash never leaves half a
//! secret behind).

use std::fs::{self, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// Reads all of `path` if it holds at most `limit` bytes; a longer file (or an endless one)
/// is an `InvalidData` error naming the limit.
pub fn read_limited(path: &Path, limit: usize) -> std::io::Result<Vec<u8>> {
    // Looked at before opening: opening a FIFO would wait for a writer.
    let kind = fs::metadata(path)?.file_type();
    if kind.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is a directory, not a file",
        ));
    }
    if !kind.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is not a regular file (a device, FIFO or socket)",
        ));
    }
    let file = fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("longer than {limit} bytes; not a file meshbus reads"),
        ));
    }
    Ok(bytes)
}

/// [`read_limited`] as UTF-8 text.
pub fn read_text_limited(path: &Path, limit: usize) -> std::io::Result<String> {
    String::from_utf8(read_limited(path, limit)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Writes `bytes` to `path` with mode 0600: to a temporary file beside it, synced, then
/// renamed over `path`.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    // A file (or link) left at the temporary name by someone else is not written through:
    // it is removed, and ours is created afresh, never following a link.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endless_or_special_file_is_refused_not_read_to_the_end() {
        let err = read_limited(Path::new("/dev/zero"), 1024).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("config.toml");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read_limited(&link, 1024).is_err());
        let big = dir.path().join("big");
        fs::write(&big, vec![b'x'; 2000]).unwrap();
        let err = read_limited(&big, 1024).unwrap_err();
        assert!(err.to_string().contains("longer than 1024 bytes"), "{err}");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(
            read_limited(&fifo, 1024).is_err(),
            "a FIFO is refused without waiting"
        );
    }

    #[test]
    fn a_planted_link_at_the_temporary_name_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        fs::write(&target, b"theirs").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(".secret.tmp")).unwrap();
        write_private(&dir.path().join("secret"), b"ours").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"theirs");
        assert_eq!(fs::read(dir.path().join("secret")).unwrap(), b"ours");
    }

    #[test]
    fn a_directory_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_limited(dir.path(), 1024).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
    }

    #[test]
    fn private_files_are_written_whole_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
