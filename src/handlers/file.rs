//! The `file` action: append events as CloudEvents JSON lines, rotating by size.

use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt as _;

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

    /// Appends `lines` (already JSON lines with their newlines) in one write.
    pub(super) async fn append(&self, lines: &[u8]) -> Result<(), ActionError> {
        let fail = |e: std::io::Error| ActionError::File {
            path: self.path.clone(),
            reason: e.to_string(),
        };
        if let Some(max) = self.max_bytes {
            let size = tokio::fs::metadata(&self.path)
                .await
                .map(|m| m.len())
                .unwrap_or(0);
            if size > 0 && size + lines.len() as u64 > max {
                self.rotate().await.map_err(fail)?;
            }
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await
            .map_err(fail)?;
        file.write_all(lines).await.map_err(fail)?;
        file.flush().await.map_err(fail)
    }

    async fn rotate(&self) -> std::io::Result<()> {
        if self.keep == 0 {
            return tokio::fs::remove_file(&self.path).await;
        }
        for i in (1..self.keep).rev() {
            let from = numbered(&self.path, i);
            if tokio::fs::try_exists(&from).await? {
                tokio::fs::rename(&from, numbered(&self.path, i + 1)).await?;
            }
        }
        tokio::fs::rename(&self.path, numbered(&self.path, 1)).await
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
                .append(format!("line number {i}\n").as_bytes())
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
