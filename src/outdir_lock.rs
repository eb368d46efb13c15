//! One process per `output.dir`: an exclusive `flock` on `output.dir/.lock`,
//! held by the daemon (`run`) and by `train` for as long as they work there. A
//! second daemon, or a `train --resume` on a live daemon's run, is refused with
//! a message naming the folder and the holder's pid. The lock goes with the
//! process (the kernel drops it on exit, `kill -9` included), so a stale file
//! never blocks a restart.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Name of the lock file inside `output.dir`.
pub const LOCK_FILE: &str = ".lock";

/// Why `output.dir` could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("output.dir {dir} is in use by another edge-trainer process{}; stop it first or use another output.dir", holder_text(*.pid))]
    Held { dir: PathBuf, pid: Option<u32> },
    /// The lock file cannot be created or locked.
    #[error("output.dir {dir}: cannot lock {}: {reason}", LOCK_FILE)]
    Io { dir: PathBuf, reason: String },
}

fn holder_text(pid: Option<u32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

/// The held lock; dropping it releases the folder.
#[derive(Debug)]
pub struct OutdirLock {
    file: File,
    dir: PathBuf,
}

impl OutdirLock {
    /// Creates `dir` if needed and takes the exclusive lock without waiting.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let io = |e: std::io::Error| LockError::Io {
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        // SAFETY: flock on a file descriptor we own; no memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse::<u32>().ok());
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                    pid,
                });
            }
            return Err(io(err));
        }
        // The holder's pid, for the message a second process prints.
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(pid.as_bytes()))
            .map_err(io)?;
        Ok(Self {
            file,
            dir: dir.to_path_buf(),
        })
    }

    /// The locked folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for OutdirLock {
    fn drop(&mut self) {
        // Best effort: the kernel releases the lock when the descriptor closes anyway.
        // SAFETY: as in `acquire`.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_pid_and_a_released_lock_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let first = OutdirLock::acquire(&out).unwrap();
        assert_eq!(first.dir(), out);
        let err = OutdirLock::acquire(&out).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, LockError::Held { pid: Some(p), .. } if p == std::process::id()));
        assert!(text.contains(&out.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        let again = OutdirLock::acquire(&out).unwrap();
        drop(again);
    }
}
