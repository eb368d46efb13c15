//! A headless Chromium driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: requests on fd 3, answers on fd 4, each a JSON
//! message ended by a NUL byte), so no WebSocket client is needed: open a page,
//! evaluate JavaScript in it (reading the DOM, clicking buttons).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use crate::helpers::on_path;
use crate::trials::Need;

/// The Chromium binary, under any of its usual names.
pub fn chromium() -> Option<PathBuf> {
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .find_map(|n| on_path(n))
}

/// A Chromium (or Chrome) on `PATH` for the dashboard test.
pub const CHROMIUM: Need = Need {
    what: "chromium on PATH",
    present: || chromium().is_some(),
    hint: "apt-get install -y chromium",
};

fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid array of two ints.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    (fds[0], fds[1])
}

/// Makes `fd` the child's `target` (without close-on-exec).
fn place(fd: RawFd, target: RawFd) -> std::io::Result<()> {
    // SAFETY: plain descriptor calls between fork and exec.
    unsafe {
        if fd == target {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        } else if libc::dup2(fd, target) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A headless browser with one page.
pub struct Browser {
    child: Child,
    to: File,
    from: BufReader<File>,
    next_id: u64,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium and opens `url` in a page.
    pub fn open(url: &str) -> Self {
        let bin = chromium().expect("chromium");
        let profile = tempfile::tempdir().unwrap();
        let (their_in, our_out) = pipe();
        let (our_in, their_out) = pipe();
        let mut cmd = Command::new(bin);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (dup2, fcntl) run in the child.
        unsafe {
            cmd.pre_exec(move || {
                place(their_in, 3)?;
                place(their_out, 4)
            });
        }
        let child = cmd.spawn().expect("start chromium");
        // SAFETY: the descriptors are ours and used once each.
        let (to, from) = unsafe {
            libc::close(their_in);
            libc::close(their_out);
            (File::from_raw_fd(our_out), File::from_raw_fd(our_in))
        };
        let mut b = Self {
            child,
            to,
            from: BufReader::new(from),
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = b.call("Target.createTarget", json!({"url": url}));
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        b
    }

    fn send(&mut self, mut msg: Value) -> u64 {
        self.next_id += 1;
        msg["id"] = json!(self.next_id);
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        self.next_id
    }

    /// A browser-level call; its `result`.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.send(json!({"method": method, "params": params}));
        self.answer(id)
    }

    fn answer(&mut self, id: u64) -> Value {
        loop {
            let mut buf = Vec::new();
            let n = self
                .from
                .read_until(0, &mut buf)
                .expect("read from chromium");
            assert!(n > 0, "chromium closed the pipe");
            buf.pop();
            let Ok(v) = serde_json::from_slice::<Value>(&buf) else {
                continue;
            };
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    panic!("chromium: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `js` in the page; its value (promises awaited).
    pub fn eval(&mut self, js: &str) -> Value {
        let id = self.send(json!({
            "sessionId": self.session,
            "method": "Runtime.evaluate",
            "params": {"expression": js, "returnByValue": true, "awaitPromise": true},
        }));
        let r = self.answer(id);
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("{js}: {ex}");
        }
        r["result"]["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
