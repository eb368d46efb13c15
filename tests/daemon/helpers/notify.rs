//! A stand-in for systemd's notify socket.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A Unix datagram socket standing in for systemd's `NOTIFY_SOCKET`, read
/// continuously by a thread (as systemd would) into `lines`.
pub struct NotifySocket {
    pub path: PathBuf,
    rx: mpsc::Receiver<(Instant, String)>,
    pub lines: Vec<String>,
    /// When each of `lines` arrived.
    pub times: Vec<Instant>,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                for line in String::from_utf8_lossy(&buf[..n]).lines() {
                    if tx.send((Instant::now(), line.to_string())).is_err() {
                        return;
                    }
                }
            }
        });
        Self {
            path,
            rx,
            lines: Vec::new(),
            times: Vec::new(),
        }
    }

    /// Takes in the lines received so far, without waiting.
    pub fn take(&mut self) {
        while let Ok((t, l)) = self.rx.try_recv() {
            self.times.push(t);
            self.lines.push(l);
        }
    }

    /// When each line equal to `line` arrived.
    pub fn times_of(&self, line: &str) -> Vec<Instant> {
        self.lines
            .iter()
            .zip(&self.times)
            .filter(|(l, _)| *l == line)
            .map(|(_, t)| *t)
            .collect()
    }

    /// Waits until `pred` holds for some line received so far, or `timeout`.
    pub fn wait(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let t0 = Instant::now();
        loop {
            self.take();
            if self.lines.iter().any(|l| pred(l)) {
                return true;
            }
            if t0.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
