//! Trials for the `harness = false` test binaries (libtest-mimic), so that a test
//! whose outside requirement (Mosquitto, openssl, `unshare`) is missing shows up
//! in the runner's count as *ignored*, with the reason, never as passed. Under
//! `CI` a missing requirement fails the test instead, loudly.
//!
//! Each test module lists its tests with [`test!`] in a `tests()` function;
//! `main` runs them all with [`run`].
//! Names are `module::function`, as libtest would print them, so
//! `cargo test NAME` and `--exact` work as before.

use std::process::{Command, ExitCode, Stdio};

use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// Something outside the repository that a test needs.
#[derive(Clone, Copy)]
pub struct Need {
    /// What it is, for the ignore reason ("needs mosquitto on PATH").
    pub what: &'static str,
    /// Whether it is available here.
    pub present: fn() -> bool,
    /// How to get it, in the failure message under `CI`.
    pub hint: &'static str,
}

/// `unshare -rm` with a tmpfs mount (a user namespace, for the full-disk tests).
pub const UNSHARE: Need = Need {
    what: "`unshare -rm` with a tmpfs mount",
    present: can_unshare,
    hint: "CI must be able to run `unshare -rm` to mount a tmpfs (util-linux, unprivileged user namespaces)",
};

fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One test: a function, what it needs, whether it is `#[ignore]`d (long runs).
pub struct Test {
    name: String,
    run: fn(),
    needs: Vec<Need>,
    ignored: bool,
}

impl Test {
    /// A test named after its module path (the binary's name stripped) and
    /// function; `ignored`: like `#[ignore]`, run only with `--ignored` or
    /// `--include-ignored` (the long measurements).
    pub fn new(module_path: &str, function: &str, run: fn(), ignored: bool) -> Self {
        let module = module_path
            .split_once("::")
            .map_or(module_path, |(_, rest)| rest);
        Self {
            name: format!("{module}::{function}"),
            run,
            needs: Vec::new(),
            ignored,
        }
    }

    /// It runs only where `need` is available; elsewhere it is ignored (or fails under `CI`).
    pub fn needs(mut self, need: Need) -> Self {
        self.needs.push(need);
        self
    }

    fn into_trial(self) -> Trial {
        let Self {
            name,
            run,
            needs,
            ignored,
        } = self;
        Trial::ignorable_test(name, move || {
            for need in &needs {
                if !(need.present)() {
                    if std::env::var_os("CI").is_some() {
                        return Err(Failed::from(format!(
                            "{} is missing but CI is set: {}",
                            need.what, need.hint
                        )));
                    }
                    return Ok(Completion::ignored_with(format!("needs {}", need.what)));
                }
            }
            run();
            Ok(Completion::Completed)
        })
        .with_ignored_flag(ignored)
    }
}

/// `test!(function)`: a [`Test`] named `module::function`;
/// `test!(function, ignored)`: the same, `#[ignore]`d.
macro_rules! test {
    ($f:ident) => {
        $crate::trials::Test::new(module_path!(), stringify!($f), $f, false)
    };
    ($f:ident, ignored) => {
        $crate::trials::Test::new(module_path!(), stringify!($f), $f, true)
    };
}
pub(crate) use test;

/// Runs `tests` with the command line cargo passed (filters, `--ignored`, `--exact`,
/// `--test-threads`, `--list`, ...).
pub fn run(tests: impl IntoIterator<Item = Vec<Test>>) -> ExitCode {
    let args = Arguments::from_args();
    let trials = tests.into_iter().flatten().map(Test::into_trial).collect();
    libtest_mimic::run(&args, trials).exit_code()
}
