//! Test support: real `ferry` daemon processes (`ferry sync`, `listener`,
//! `drainer`) with their logs in a file, stopped with SIGTERM or SIGKILL,
//! killed on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{output_within, wait_exit_within};

/// Log lines the daemons write, which tests wait for (one place to keep in
/// step with the sources named).
pub mod log {
    /// The listener (src/listener/mod.rs).
    pub const FULL_SYNC_STARTED: &str = "full resync: storing the source's rdb";
    pub const FULL_SYNC_STORED: &str = "full resync stored";
    pub const PARTIAL_RESYNC: &str = "partial resync";
    pub const LINK_LOST: &str = "replication link lost; reconnecting";
    /// The shipper (src/ship/shipper.rs).
    pub const DRAINER_OFFLINE: &str = "drainer offline";
    pub const DRAINER_ONLINE: &str = "drainer online";
    /// The drainer's endpoint (src/ship/drainer.rs).
    pub const STREAM_ACCEPTED: &str = "ship stream accepted";
    /// The applier (src/apply/mod.rs); `APPLYING` is its session start,
    /// after it read the checkpoint.
    pub const APPLY_FAILED: &str = "apply failed; retrying";
    pub const APPLY_BACK: &str = "target reachable again; applying";
    pub const APPLYING: &str = "ferry::apply: applying";
    /// The applier found the target's checkpoint behind the WAL's applied
    /// mark (the target lost acknowledged writes).
    pub const TARGET_BEHIND: &str = "the target is behind the wal's applied mark";
    /// The applier's fatal gap (src/apply/mod.rs `ApplyError::Gap`).
    pub const GAP: &str = "without a snapshot marker there";
    /// A session's first `EXEC` refused by the `WATCH` guard
    /// (`ApplyError::CheckpointMoved`).
    pub const CHECKPOINT_MOVED: &str = "the checkpoint changed under it";
    /// A node stopping on a fatal error (src/node/run.rs).
    pub const NODE_STOPS: &str = "stopping the node";
    /// The shipper's line when a drainer needs entries the listener no
    /// longer holds.
    pub const FALLBACK_SNAPSHOT: &str = "sending a fallback snapshot";
    /// An applier reading the listener's WAL (`ferry sync`) asking for a
    /// fallback snapshot (src/apply/reader.rs), and getting it.
    pub const ASKS_FALLBACK: &str = "asking the listener for a fallback snapshot";
    pub const FALLBACK_TAKEN: &str = "fallback snapshot taken; it is loaded";
    /// ... because the snapshot loading at the target's checkpoint was a
    /// fallback (no marker at that id in the log).
    pub const FALLBACK_WAS_LOADING: &str = "a fallback snapshot was loading";
    /// An applier of `ferry sync` loading a full resync while it is stored
    /// (src/apply/snapshot.rs).
    pub const PRELOAD: &str = "loading it as it comes";
    /// The applier of `ferry sync` with early apply (`[apply] early-apply`)
    /// starting from a checkpoint written while the entry it names was not
    /// durable yet (a `v3` value with `src=`): it compares that entry's
    /// source position with the one the log holds at its id now, and either
    /// resumes after it or takes a fallback snapshot.
    pub const EARLY_CHECKED: &str = "applied before it was durable";
    pub const EARLY_SAME: &str = "the log holds the same entry";
    pub const EARLY_OTHER: &str = "the log holds another entry there";
}

/// The `ferry` binary cargo built for this test run.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// A running ferry daemon.
pub struct FerryProcess {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    /// Extra environment of the next spawns.
    env: Vec<(String, String)>,
}

impl FerryProcess {
    /// Starts `ferry <args>`; its stderr goes to `<data_dir>.log` (appended,
    /// so restarts keep the history). `data_dir` is where the daemon writes
    /// `admin.addr`.
    pub fn start(data_dir: &Path, args: &[String]) -> FerryProcess {
        FerryProcess::start_with_env(data_dir, args, &[])
    }

    /// [`FerryProcess::start`] with `env` added to the process's
    /// environment, this spawn and the next ones (e.g. a test hook such as
    /// `FERRY_TEST_WAL_SYNC_DELAY_MS`).
    pub fn start_with_env(data_dir: &Path, args: &[String], env: &[(&str, &str)]) -> FerryProcess {
        let log = data_dir.with_extension("log");
        let mut process = FerryProcess {
            child: None,
            data_dir: data_dir.to_path_buf(),
            log,
            args: args.to_vec(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        process.spawn();
        process
    }

    /// Stops the process (SIGKILL) if it runs and starts it again with the
    /// same arguments and `env` (replacing the extra environment of earlier
    /// spawns).
    pub fn respawn_with_env(&mut self, env: &[(&str, &str)]) {
        self.kill9();
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn();
    }

    /// `ferry sync` between two servers, admin on a free port.
    pub fn sync(data_dir: &Path, source: &str, target: &str, extra: &[&str]) -> FerryProcess {
        FerryProcess::sync_with_env(data_dir, source, target, extra, &[])
    }

    /// [`FerryProcess::sync`] with `env` added to the process's environment
    /// ([`FerryProcess::start_with_env`]).
    pub fn sync_with_env(
        data_dir: &Path,
        source: &str,
        target: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> FerryProcess {
        let mut args: Vec<String> = [
            "sync",
            "--source",
            source,
            "--target",
            target,
            "--data-dir",
            data_dir.to_str().expect("utf-8 path"),
            "--admin",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        FerryProcess::start_with_env(data_dir, &args, env)
    }

    /// `ferry <verb> --config FILE` (`listener` or `drainer`); `data_dir` is
    /// the `data-dir` the file names.
    pub fn with_config(verb: &str, config: &Path, data_dir: &Path) -> FerryProcess {
        let args = vec![
            verb.to_string(),
            "--config".to_string(),
            config.to_str().expect("utf-8 path").to_string(),
        ];
        FerryProcess::start(data_dir, &args)
    }

    /// Starts the process again with the same arguments (after a stop or kill).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let _ = std::fs::remove_file(self.data_dir.join("admin.addr"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open ferry log");
        let child = Command::new(ferry_bin())
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ferry");
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (panics after `timeout`, with the
    /// log's tail).
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        if !wait_exit_within(&mut child, timeout) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ferry did not stop within {timeout:?} of SIGTERM; {}",
                self.log_tail(40)
            );
        }
        child.wait().expect("wait ferry")
    }

    /// Whether the process has exited (and how).
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// Whether the process is gone or a zombie, read from `/proc` (works
    /// through a shared reference, unlike [`FerryProcess::try_exit`]);
    /// false when it is not started.
    pub fn has_exited(&self) -> bool {
        let Some(child) = self.child.as_ref() else {
            return false;
        };
        match std::fs::read_to_string(format!("/proc/{}/stat", child.id())) {
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
            Err(_) => true,
        }
    }

    /// The admin address, once the daemon wrote `admin.addr`.
    pub fn admin_addr(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = std::fs::read_to_string(self.data_dir.join("admin.addr")) {
                if text.ends_with('\n') {
                    return text.trim().to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no admin.addr; {}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ferry status --admin ADDR --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let addr = self.admin_addr(Duration::from_secs(30));
        let out = output_within(
            Command::new(ferry_bin()).args(["status", "--admin", &addr, "--json"]),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|error| panic!("ferry status: {error}; {}", self.log_tail(40)));
        assert!(
            out.status.success(),
            "ferry status failed: {}; the process {}; {}",
            String::from_utf8_lossy(&out.stderr),
            if self.has_exited() {
                "has exited"
            } else {
                "runs"
            },
            self.log_tail(40)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|error| panic!("status JSON: {error}; {}", self.log_tail(40)))
    }

    /// The log's length in bytes: a mark for [`FerryProcess::log_since`].
    /// Fallback snapshots of partition 0 so far: sent to the drainer, or
    /// (`ferry sync` applying from the listener's WAL) loaded by the
    /// applier.
    pub fn fallback_snapshots(&self) -> u64 {
        let status = self.status_json();
        let shipped = status["listeners"][0]["shipping"][0]["fallback_snapshots"]
            .as_u64()
            .unwrap_or(0);
        shipped
            + status["drainers"][0]["fallback_snapshots"]
                .as_u64()
                .unwrap_or(0)
    }

    pub fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map_or(0, |meta| meta.len())
    }

    /// What the log got since `mark` (a [`FerryProcess::log_len`]).
    pub fn log_since(&self, mark: u64) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        let start = (mark as usize).min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        format!(
            "ferry log {} ends:\n{}",
            self.log.display(),
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }
}

impl Drop for FerryProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends `SIG<name>` to `pid` with kill(1).
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status();
}

/// Runs the real `ferry verify --source S --target T --json` (one pass, no
/// rate limit, 10,000 keys per page: the load has stopped and the target
/// caught up) and requires
/// exit 0 and no difference in its JSON; returns the report. Panics with
/// the differences listed and `context()` (e.g. the nodes' log tails).
pub fn assert_verify_clean(
    what: &str,
    source_url: &str,
    target_url: &str,
    context: impl Fn() -> String,
) -> serde_json::Value {
    let out = output_within(
        Command::new(ferry_bin()).args([
            "verify", "--source", source_url, "--target", target_url, "--json", "--passes", "1",
            "--qps", "0", "--batch", "10000",
        ]),
        Duration::from_secs(120),
    )
    .unwrap_or_else(|error| panic!("{what}: ferry verify: {error}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|error| {
        panic!(
            "{what}: ferry verify printed no JSON ({error}), exit {:?}: {stdout}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let differences = report["differences_total"].as_u64();
    assert!(
        out.status.success() && report["equal"] == true && differences == Some(0),
        "{what}: ferry verify exit {:?}, {differences:?} differences:\n{}\n{}",
        out.status.code(),
        serde_json::to_string_pretty(&report["differences"]).unwrap_or_default(),
        context()
    );
    let checked: u64 = report["dbs"]
        .as_array()
        .map(|dbs| {
            dbs.iter()
                .filter_map(|db| db["keys_checked"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    assert!(checked > 0, "{what}: ferry verify checked no key: {stdout}");
    println!("{what}: ferry verify clean, {checked} keys checked");
    report
}
