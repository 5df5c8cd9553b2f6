//! Secrets kept off the command line, out of error messages and in private
//! directories, with real `ferry` processes and real redis-servers that
//! require a password (`requirepass`) and an ACL user:
//!
//! - `ferry sync` takes the source's and the target's passwords from a file
//!   (`--source-password-file`) or the environment (`FERRY_SOURCE_PASSWORD`,
//!   `FERRY_TARGET_PASSWORD`, with the ACL user named in the URL), and the
//!   running process's command line (`/proc/<pid>/cmdline`, what `ps`
//!   shows) holds neither password;
//! - the data dir, the WAL dirs under it, created by `ferry sync`, are mode
//!   0700;
//! - a password given twice is refused with an error naming both places
//!   and not the password; a broken config file's error names the file,
//!   line, column and key, never the secret on the bad line;
//! - `ferry rdb fetch` and `ferry verify` take passwords the same way.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::RedisServer;

const SOURCE_PASSWORD: &str = "src-Pa55word-7c1e";
const TARGET_PASSWORD: &str = "app-Pa55word-91af";
const ADMIN_PASSWORD: &str = "admin-Pa55word-02bd";

fn ferry() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    // Only what a test passes explicitly.
    cmd.env_remove("FERRY_SOURCE_PASSWORD")
        .env_remove("FERRY_TARGET_PASSWORD");
    cmd
}

/// A redis-server whose default user needs `password`.
fn server_with_password(password: &str) -> RedisServer {
    RedisServer::start(&["--requirepass", password])
}

/// `redis-cli` as the default user of a server started with `password`.
fn cli(server: &RedisServer, password: &str, args: &[&str]) -> String {
    let mut full = vec!["-a", password, "--no-auth-warning"];
    full.extend_from_slice(args);
    server.cmd(&full)
}

/// A target whose default user has `ADMIN_PASSWORD`, with an ACL user
/// `app` (password `TARGET_PASSWORD`) allowed everything ferry does.
fn target_with_acl_user() -> RedisServer {
    let target = server_with_password(ADMIN_PASSWORD);
    let reply = cli(
        &target,
        ADMIN_PASSWORD,
        &[
            "ACL",
            "SETUSER",
            "app",
            "on",
            &format!(">{TARGET_PASSWORD}"),
            "~*",
            "&*",
            "+@all",
        ],
    );
    assert_eq!(reply, "OK");
    target
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `ferry sync` child, killed on drop; its stderr in a log file removed
/// on drop.
struct Sync {
    child: Child,
    log: PathBuf,
}

impl Sync {
    fn start(data: &Path, args: &[&str], env: &[(&str, &str)]) -> Sync {
        // Beside the tempdir's top, which exists (the data dir's parents
        // may not: ferry creates them).
        let name = data.file_name().expect("a data dir name").to_string_lossy();
        let log =
            std::env::temp_dir().join(format!("ferry-secrets-{}-{name}.log", std::process::id()));
        let mut cmd = ferry();
        cmd.arg("sync")
            .args(args)
            .arg("--data-dir")
            .arg(data)
            .args(["--admin", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Sync {
            child: cmd.spawn().expect("spawn ferry sync"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What `ps` shows of it: its argv, NUL-separated.
    fn cmdline(&self) -> String {
        let raw = std::fs::read(format!("/proc/{}/cmdline", self.child.id())).expect("cmdline");
        String::from_utf8_lossy(&raw).replace('\0', " ")
    }
}

impl Drop for Sync {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Runs one sync from `source` to `target` and checks it replicates, that
/// the passwords are not on its command line and that its dirs are 0700.
fn check_sync(
    source: &RedisServer,
    target: &RedisServer,
    data: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) {
    let run = data.file_name().unwrap().to_string_lossy().into_owned();
    let (before, after) = (format!("{run}:before"), format!("{run}:after"));
    cli(source, SOURCE_PASSWORD, &["SET", &before, "1"]);
    let sync = Sync::start(data, args, env);
    wait_for("the full sync", Duration::from_secs(60), || {
        cli(target, ADMIN_PASSWORD, &["GET", &before]) == "1"
    });
    cli(source, SOURCE_PASSWORD, &["INCR", &after]);
    wait_for("a streamed write", Duration::from_secs(30), || {
        cli(target, ADMIN_PASSWORD, &["GET", &after]) == "1"
    });
    // The startup precheck reached both sides with their passwords (a
    // side it cannot authenticate to only makes it warn).
    assert!(
        sync.log()
            .contains("precheck before the first full sync passed"),
        "{}",
        sync.log()
    );
    let cmdline = sync.cmdline();
    assert!(cmdline.contains("sync"), "{cmdline}");
    for password in [SOURCE_PASSWORD, TARGET_PASSWORD, ADMIN_PASSWORD] {
        assert!(!cmdline.contains(password), "password in ps: {cmdline}");
        assert!(!sync.log().contains(password), "password in the log");
    }
    // The WAL dir (the appliers read the listener's: no drainer WAL).
    for dir in [data.to_path_buf(), data.join("listener")] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    assert!(!data.join("drainer").exists());
}

#[test]
fn sync_takes_passwords_from_a_file_or_the_environment_never_the_command_line() {
    let source = server_with_password(SOURCE_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let source_file = dir.path().join("source.password");
    std::fs::write(&source_file, format!("{SOURCE_PASSWORD}\n")).unwrap();
    let source_url = format!("redis://127.0.0.1:{}", source.port);

    // Source password from a file, the target's ACL user's from the
    // environment; the data dir is new (and so are its parents).
    let target = target_with_acl_user();
    let data = dir.path().join("new/parent/sync-a");
    check_sync(
        &source,
        &target,
        &data,
        &[
            "--source",
            &source_url,
            "--source-password-file",
            source_file.to_str().unwrap(),
            "--target",
            &format!("redis://app@127.0.0.1:{}", target.port),
            "--id",
            "a",
        ],
        &[("FERRY_TARGET_PASSWORD", TARGET_PASSWORD)],
    );
    assert_eq!(mode(&dir.path().join("new")), 0o700);

    // The other way round: the source's from the environment, the
    // target's from a file (in a config file's key).
    let target = target_with_acl_user();
    let target_file = dir.path().join("target.password");
    std::fs::write(&target_file, TARGET_PASSWORD).unwrap();
    let config = dir.path().join("sync.toml");
    std::fs::write(
        &config,
        format!(
            "target = \"redis://app@127.0.0.1:{}\"\ntarget-password-file = \"{}\"\n",
            target.port,
            target_file.display()
        ),
    )
    .unwrap();
    check_sync(
        &source,
        &target,
        &dir.path().join("sync-b"),
        &[
            "--source",
            &source_url,
            "--config",
            config.to_str().unwrap(),
            "--id",
            "b",
        ],
        &[("FERRY_SOURCE_PASSWORD", SOURCE_PASSWORD)],
    );
}

/// Runs `ferry ARGS` with `env`, which must fail; its stderr.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = ferry();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = common::output_within(&mut cmd, Duration::from_secs(60)).expect("run ferry");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
    stderr
}

#[test]
fn passwords_given_twice_and_broken_configs_are_refused_without_showing_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, SOURCE_PASSWORD).unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let file_arg = file.to_str().unwrap();
    let inline = format!("redis://:{SOURCE_PASSWORD}@127.0.0.1:1");

    // In the URL and in a file.
    let error = refused(
        &[
            "sync",
            "--source",
            &inline,
            "--source-password-file",
            file_arg,
            "--target",
            "127.0.0.1:2",
            "--data-dir",
            data_arg,
        ],
        &[],
    );
    assert!(
        error.contains("listener.source") && error.contains("the URL"),
        "{error}"
    );
    // In a file and in the environment.
    let error = refused(
        &[
            "sync",
            "--source",
            "redis://127.0.0.1:1",
            "--source-password-file",
            file_arg,
            "--target",
            "127.0.0.1:2",
            "--data-dir",
            data_arg,
        ],
        &[("FERRY_SOURCE_PASSWORD", SOURCE_PASSWORD)],
    );
    assert!(
        error.contains("--source-password-file") && error.contains("FERRY_SOURCE_PASSWORD"),
        "{error}"
    );
    // The same for the other verbs.
    let error = refused(
        &["rdb", "fetch", "--source", &inline, "out.rdb"],
        &[("FERRY_SOURCE_PASSWORD", SOURCE_PASSWORD)],
    );
    assert!(
        error.contains("--source") && error.contains("FERRY_SOURCE_PASSWORD"),
        "{error}"
    );
    let error = refused(
        &[
            "verify",
            "--source",
            "127.0.0.1:1",
            "--target",
            &inline.replace(":1", ":2"),
        ],
        &[("FERRY_TARGET_PASSWORD", SOURCE_PASSWORD)],
    );
    assert!(
        error.contains("--target") && error.contains("the URL"),
        "{error}"
    );
    assert!(!data.exists(), "nothing was started");

    // A broken config whose bad line holds the secret.
    let config = dir.path().join("listener.toml");
    std::fs::write(
        &config,
        format!(
            "data-dir = \"{data_arg}\"\n[listener]\nsource = \"redis://:{SOURCE_PASSWORD}@127.0.0.1:1\"\n\
             [[drainers]]\nid = \"d\"\nendpoint = \"http://127.0.0.1:2\"\nsecret = {TARGET_PASSWORD}\n"
        ),
    )
    .unwrap();
    let error = refused(&["listener", "--config", config.to_str().unwrap()], &[]);
    assert!(
        error.contains("listener.toml") && error.contains("line 7, column 10"),
        "{error}"
    );
    assert!(error.contains("drainers.secret"), "{error}");

    for error in [&error] {
        for password in [SOURCE_PASSWORD, TARGET_PASSWORD] {
            assert!(!error.contains(password), "{password} shown: {error}");
        }
    }
}

#[test]
fn rdb_fetch_and_verify_take_passwords_from_the_environment_or_a_file() {
    let source = server_with_password(SOURCE_PASSWORD);
    cli(&source, SOURCE_PASSWORD, &["SET", "k", "v"]);
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("snapshot.rdb");
    let url = format!("redis://127.0.0.1:{}", source.port);
    let mut cmd = ferry();
    cmd.args(["rdb", "fetch", "--source", &url])
        .arg(&out_file)
        .env("FERRY_SOURCE_PASSWORD", SOURCE_PASSWORD);
    let out = common::output_within(&mut cmd, Duration::from_secs(60)).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out_file.exists());
    // Without it: refused by the server, the password not guessed.
    let mut cmd = ferry();
    cmd.args(["rdb", "fetch", "--source", &url])
        .arg(dir.path().join("x.rdb"));
    let out = common::output_within(&mut cmd, Duration::from_secs(60)).unwrap();
    assert!(!out.status.success());

    let file = dir.path().join("password");
    std::fs::write(&file, SOURCE_PASSWORD).unwrap();
    let mut cmd = ferry();
    cmd.args([
        "verify", "--source", &url, "--target", &url, "--passes", "1",
    ])
    .args(["--source-password-file", file.to_str().unwrap()])
    .env("FERRY_TARGET_PASSWORD", SOURCE_PASSWORD);
    let out = common::output_within(&mut cmd, Duration::from_secs(60)).unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
