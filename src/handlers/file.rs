//! The `file` action: append events as CloudEvents JSON lines, rotating by size.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::action::ActionError;

/// Append to a file; when it would pass `max_bytes`, rename it to `PATH.1` (shifting older
/// ones to `.2`, … up to `keep`) and start a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileAction {
    /// The file.
    pub path: PathBuf,
    /// Rotate when the file would grow past this; `None` never rotates.
    pub max_bytes: Option<u64>,
    /// Rotated files kept (`PATH.1` is the newest).
    pub keep: usize,
}

impl FileAction {
    /// Appends to `path`, never rotating.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_bytes: None,
            keep: 0,
        }
    }

    /// Appends `lines` (already JSON lines with their newlines) in one write, on the
    /// blocking pool in one hop: `tokio::fs` would take a hop for each call (look at the
    /// size, open, write, flush), and each is a wake-up between threads.
    pub(super) async fn append(&self, lines: Vec<u8>) -> Result<(), ActionError> {
        let this = self.clone();
        let written = tokio::task::spawn_blocking(move || this.append_now(&lines))
            .await
            .unwrap_or_else(|e| {
                let what = if e.is_panic() {
                    "panicked"
                } else {
                    "was cancelled"
                };
                Err(std::io::Error::other(format!("the write {what}: {e}")))
            });
        written.map_err(|e| ActionError::File {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }

    fn append_now(&self, lines: &[u8]) -> std::io::Result<()> {
        if let Some(max) = self.max_bytes {
            let size = std::fs::metadata(&self.path).map_or(0, |m| m.len());
            if size > 0 && size + lines.len() as u64 > max {
                self.rotate()?;
            }
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?
            .write_all(lines)
    }

    fn rotate(&self) -> std::io::Result<()> {
        if self.keep == 0 {
            return std::fs::remove_file(&self.path);
        }
        for i in (1..self.keep).rev() {
            let from = numbered(&self.path, i);
            if std::fs::exists(&from)? {
                std::fs::rename(&from, numbered(&self.path, i + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(&self.path, 1))
    }
}

/// `PATH.n`.
pub fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rotates_by_size_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let action = FileAction {
            path: path.clone(),
            max_bytes: Some(30),
            keep: 2,
        };
        for i in 0..5 {
            action
                .append(format!("line number {i}\n").into_bytes())
                .await
                .unwrap();
        }
        // 14 bytes a line, so every second append rotates.
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        assert_eq!(read(path.clone()), "line number 4\n");
        assert_eq!(read(numbered(&path, 1)), "line number 2\nline number 3\n");
        assert_eq!(read(numbered(&path, 2)), "line number 0\nline number 1\n");
        assert!(!numbered(&path, 3).exists());
    }
}
