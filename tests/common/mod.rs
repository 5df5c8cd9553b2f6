//! Test support: real `redis-server` processes on free loopback ports, each
//! in its own temp dir, killed on drop.
#![allow(dead_code)]

pub mod cluster;
pub mod crash;
pub mod ferry;
pub mod http;
pub mod load;
pub mod pki;
pub mod proxy;
pub mod resp;
pub mod side;
pub mod two_way;
pub mod workload;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Ports [`free_port`] handed out in this process: never twice.
static FREE_PORTS_TAKEN: std::sync::Mutex<Option<std::collections::HashSet<u16>>> =
    std::sync::Mutex::new(None);

/// A free TCP port on 127.0.0.1, for a server the test starts or a daemon
/// it names in a config: from 2000..12000, below the kernel's ephemeral
/// range (32768 and up), so no outgoing connection of a parallel test and
/// no bind to port 0 can take it between this call and the bind; never
/// the same twice in one test process, and free when handed out. (Cluster
/// nodes take theirs from 12000..32000: `cluster::cluster_port`.)
pub fn free_port() -> u16 {
    let seed = u64::from(std::process::id()) * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::from(d.subsec_nanos()))
            .unwrap_or(0);
    let mut taken = FREE_PORTS_TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    let taken = taken.get_or_insert_with(std::collections::HashSet::new);
    for step in 0..10_000u64 {
        let port = 2000 + ((seed + step * 37) % 10_000) as u16;
        if taken.insert(port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 2000..12000");
}

pub fn redis_server_bin() -> String {
    std::env::var("FERRY_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_string())
}

pub fn redis_cli_bin() -> String {
    std::env::var("FERRY_REDIS_CLI").unwrap_or_else(|_| "redis-cli".to_string())
}

/// Runs `cmd` to completion like `Command::output`, but kills it and returns
/// a `TimedOut` error after `timeout`: no test waits forever on a child.
pub fn output_within(
    cmd: &mut Command,
    timeout: Duration,
) -> std::io::Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return child.wait_with_output();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{cmd:?} still running after {timeout:?}; killed"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for `child` to exit, at most `timeout`; false if it is still running.
pub fn wait_exit_within(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Longest a single `redis-cli` call may take in a test.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `redis-server`.
pub struct RedisServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl RedisServer {
    /// Starts a server with debug commands enabled, no persistence, and
    /// `extra` config directives (e.g. `["--repl-diskless-sync", "yes"]`).
    pub fn start(extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, extra)
    }

    /// Starts a server in `dir` (which may already hold a `dump.rdb`).
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> RedisServer {
        for _attempt in 0..5 {
            let port = free_port();
            let mut cmd = Command::new(redis_server_bin());
            cmd.arg("--port")
                .arg(port.to_string())
                .args(["--bind", "127.0.0.1"])
                .arg("--dir")
                .arg(dir.path())
                .args(["--save", "", "--appendonly", "no"])
                .args(["--enable-debug-command", "yes"])
                .args(["--daemonize", "no", "--protected-mode", "no"])
                .args(["--logfile", "redis.log"])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", redis_server_bin()));
            if wait_ready(&mut child, port, Duration::from_secs(20)) {
                return RedisServer { port, dir, child };
            }
            // Port taken between free_port() and bind, or a slow start: retry.
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start (log in {:?})", dir.path());
    }

    /// The server's process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against this server; returns stdout.
    pub fn cli(&self, args: &[&str]) -> std::io::Result<String> {
        let out = output_within(
            Command::new(redis_cli_bin())
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(args),
            CLI_TIMEOUT,
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `redis-cli` that must succeed; returns trimmed stdout.
    pub fn cmd(&self, args: &[&str]) -> String {
        self.cli(args).expect("redis-cli").trim().to_string()
    }

    /// A field of `INFO`.
    pub fn info_field(&self, field: &str) -> Option<String> {
        let info = self.cmd(&["INFO", "everything"]);
        info.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| *k == field)
            .map(|(_, v)| v.trim().to_string())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Kills the server without letting it save.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_ready(child: &mut Child, port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        let out = output_within(
            Command::new(redis_cli_bin()).args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "PING",
            ]),
            Duration::from_secs(5),
        );
        if let Ok(out) = out {
            let reply = String::from_utf8_lossy(&out.stdout);
            if reply.contains("PONG") || reply.contains("NOAUTH") {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// A redis-server that keeps its port and dir across restarts (the target the
// sync is configured with cannot move), with its pid for SIGSTOP/SIGCONT.

pub struct FixedPortRedis {
    pub port: u16,
    pub dir: tempfile::TempDir,
    extra: Vec<String>,
    child: Option<Child>,
}

impl FixedPortRedis {
    pub fn start(extra: &[&str]) -> FixedPortRedis {
        FixedPortRedis::start_on(free_port(), extra)
    }

    /// Starts a server on `port` (e.g. one a daemon was told to use before
    /// anything listened there).
    pub fn start_on(port: u16, extra: &[&str]) -> FixedPortRedis {
        let mut server = FixedPortRedis {
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.spawn();
        server
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(redis_server_bin())
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--enable-debug-command", "yes"])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .args(["--logfile", "redis.log"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", redis_server_bin()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = resp::Conn::connect(&self.addr(), Duration::from_secs(2))
                .and_then(|mut conn| conn.call(&["PING"]))
                .is_ok_and(|reply| reply == resp::Resp::Simple("PONG".into()));
            if ready {
                return;
            }
            let log = std::fs::read_to_string(self.dir.path().join("redis.log"));
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start: {log:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `redis-cli` that must succeed; returns trimmed stdout.
    pub fn cmd(&self, args: &[&str]) -> String {
        let out = output_within(
            Command::new(redis_cli_bin())
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(args),
            CLI_TIMEOUT,
        )
        .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for FixedPortRedis {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A stopped process dies of SIGKILL too, but let it run first
            // so that nothing is left half-way in the kernel.
            ferry::signal(child.id(), "CONT");
        }
        self.kill9();
    }
}
