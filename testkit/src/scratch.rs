//! A scratch directory for tests that need files on disk (certificates, keys, token
//! files, configs): unique per call, so tests running in parallel never share one, and
//! removed when dropped, so a run leaves nothing behind in the temp directory.

use std::io;
use std::path::{Path, PathBuf};

/// A fresh directory under the system temp directory, removed (with its contents) on drop.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// Creates `<temp>/<prefix>-<uuid>`; the prefix says which test left it, should a
    /// crashed run leave one behind.
    pub fn new(prefix: &str) -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Where `name` would be in the directory (the file need not exist).
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `contents` to `name` in the directory and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> io::Result<PathBuf> {
        let path = self.0.join(name);
        std::fs::write(&path, contents)?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Best effort: a directory a test already removed, or one still open on a
        // platform that refuses, is not worth failing the test over.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
