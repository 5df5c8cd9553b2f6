//! The web dashboard of `ferry serve` (src/serve/ui/), driven in a real
//! headless Chromium through chromedriver (fantoccini): a task created in the
//! wizard against two real redis-servers reaches INCREMENTAL, replicates,
//! is stopped, started and canceled from its page through the confirmation
//! dialog, and a precheck against a dead target shows its FAIL in the wizard.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`bash tools/setup.sh`);
//! without them the test fails, naming what is missing (it never skips).
//! `FERRY_CHROMIUM` and `FERRY_CHROMEDRIVER` override the binaries.
//! Screenshots of each page are written to `FERRY_SCREENSHOT_DIR` (default:
//! a fresh directory under the system temp dir, printed; kept after the run).

mod common;

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;

use common::ferry::{signal, FerryProcess};
use common::{free_port, wait_exit_within, RedisServer};

/// Longest wait for a page element to reach a state.
const UI_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for a task to reach INCREMENTAL after it was created or started.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Between two looks at the page, the API or a redis-server.
const POLL: Duration = Duration::from_millis(150);

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 900;

/// Keys written to the source before the task exists (its full sync).
const SEEDED_KEYS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_creates_stops_starts_and_cancels_a_task_in_a_real_browser() {
    let started = Instant::now();
    let chromium = find_chromium();
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    seed_source(&source);

    let work = tempfile::tempdir().expect("temp dir");
    let data_dir = work.path().join("serve");
    let http = format!("127.0.0.1:{}", free_port());
    let ferry = FerryProcess::start(
        &data_dir,
        &[
            "serve".to_string(),
            "--data-dir".to_string(),
            data_dir.to_str().expect("utf-8 path").to_string(),
            "--http".to_string(),
            http.clone(),
        ],
    );
    wait_for_daemon(&ferry, &http);
    let (status, index) = http_request("GET", &http, "/").expect("GET /");
    assert!(
        status == 200 && index.contains("/app.js"),
        "GET / is not the dashboard: {status} {index:.300}"
    );

    let driver = ChromeDriver::start(work.path());
    let ui = Ui {
        client: driver.connect(&chromium, work.path()).await,
        base: format!("http://{http}"),
        shots: screenshot_dir(),
        ferry,
    };
    println!("screenshots in {}", ui.shots.display());

    // The empty list.
    ui.goto("/").await;
    ui.wait_displayed("task-empty").await;
    ui.screenshot("1-list-empty").await;

    // The wizard's precheck against a target nothing listens on: a FAIL (or
    // the error of a precheck that could not run) shown in the page, and no
    // way to create the task.
    ui.click("new-task").await;
    // Two-way is offered for both kinds of pair ferry sync runs it between.
    let modes = ui.text("f-mode").await.unwrap_or_default();
    assert!(
        modes.contains("two-way (two standalone servers or two clusters, Redis 7+)"),
        "the mode options: {modes:?}"
    );
    let dead_port = free_port();
    ui.fill("f-name", "orders").await;
    ui.fill("f-source", &source.url()).await;
    ui.fill("f-target", &format!("redis://127.0.0.1:{dead_port}"))
        .await;
    ui.click("btn-precheck").await;
    let failure = ui
        .wait("the precheck's FAIL or error", UI_TIMEOUT, || async {
            if ui.displayed("wizard-error").await {
                return ui.text("wizard-error").await;
            }
            match ui.text("precheck-verdict").await?.as_str() {
                "FAIL" => ui.text("precheck-result").await,
                other => Err(format!("verdict {other:?}")),
            }
        })
        .await;
    assert!(
        failure.contains(&dead_port.to_string()),
        "the precheck's failure does not name the dead target's port {dead_port}: {failure}"
    );
    assert!(
        !ui.enabled("btn-create").await,
        "Create is enabled after a failed precheck"
    );
    ui.screenshot("2-wizard-precheck-fail").await;

    // Corrected: the precheck passes (or warns), its table is shown, and
    // Create becomes possible.
    ui.fill("f-target", &target.url()).await;
    assert!(
        !ui.enabled("btn-create").await,
        "Create is enabled before the precheck ran on the corrected form"
    );
    ui.click("btn-precheck").await;
    let verdict = ui
        .wait("a PASS or WARN precheck", UI_TIMEOUT, || async {
            match ui.text("precheck-verdict").await?.as_str() {
                verdict @ ("PASS" | "WARN") => Ok(verdict.to_string()),
                other => Err(format!("verdict {other:?}; {}", ui.page_text().await)),
            }
        })
        .await;
    let checks = ui.count("[data-testid=precheck-row]").await;
    assert!(
        checks > 0 || ui.displayed("precheck-table").await,
        "no precheck table shown"
    );
    println!("precheck {verdict}, {checks} checks");
    ui.wait_enabled("btn-create").await;
    ui.screenshot("3-wizard-precheck").await;
    ui.click("btn-create").await;

    // The task's page: INCREMENTAL with its partitions, replicating.
    ui.wait("the task's page", UI_TIMEOUT, || async {
        let url = ui.url().await?;
        url.ends_with("#/tasks/orders")
            .then_some(())
            .ok_or(format!("at {url}"))
    })
    .await;
    ui.wait_state("INCREMENTAL", SYNC_TIMEOUT).await;
    let partitions = ui
        .wait("the partition table's rows", UI_TIMEOUT, || async {
            let rows = ui.count("[data-testid=partition-row]").await;
            (rows >= 2).then_some(rows).ok_or(format!("{rows} rows"))
        })
        .await;
    println!("task INCREMENTAL, {partitions} partition rows");
    wait_key(&ui, &target, &format!("app:{}", SEEDED_KEYS - 1), "seeded").await;
    source.cmd(&["SET", "late:key", "after-incremental"]);
    wait_key(&ui, &target, "late:key", "after-incremental").await;
    assert!(
        !checkpoint_keys(&target).is_empty(),
        "no __ferry:checkpoint:orders:* key on the target while the task runs"
    );
    // Two lag samples (one every 2 s) make the chart.
    ui.wait_displayed_css("[data-testid=chart-lag]").await;
    ui.screenshot("4-task-incremental").await;

    // The list shows it running; its link leads back to its page.
    ui.click("nav-tasks").await;
    ui.wait("the task INCREMENTAL in the list", UI_TIMEOUT, || async {
        let row = ui
            .client
            .find(Locator::Css("[data-task-id=orders]"))
            .await
            .map_err(|error| error.to_string())?;
        let state = row.attr("data-state").await.map_err(|e| e.to_string())?;
        (state.as_deref() == Some("INCREMENTAL"))
            .then_some(())
            .ok_or(format!("state {state:?}"))
    })
    .await;
    ui.screenshot("5-list-running").await;
    ui.click_css("[data-task-id=orders] a.task-link").await;
    ui.wait_state("INCREMENTAL", UI_TIMEOUT).await;

    // Stop, through the confirmation dialog.
    ui.stop(Some("6-confirm-stop")).await;
    source.cmd(&["SET", "while:stopped", "kept-in-the-source"]);
    ui.screenshot("7-task-stopped").await;

    // An action's error is shown next to the buttons: the task is started
    // through the API while Start's dialog is open, so the page's own start
    // is refused.
    ui.click("btn-start").await;
    ui.wait_displayed("modal-confirm").await;
    let (status, reply) =
        http_request("POST", &http, "/api/v1/tasks/orders/start").expect("POST start");
    assert_eq!(status, 200, "start through the API: {reply}");
    ui.click("modal-confirm").await;
    ui.wait_displayed("action-error").await;
    let refused = ui.text("action-error").await.unwrap_or_default();
    assert!(
        refused.starts_with("Start task failed:"),
        "action error: {refused}"
    );
    println!("shown next to the buttons: {refused}");
    ui.wait_state("INCREMENTAL", SYNC_TIMEOUT).await;
    ui.screenshot("8-action-error").await;
    wait_key(&ui, &target, "while:stopped", "kept-in-the-source").await;

    // Stop and start from the page: back to INCREMENTAL, and what the source
    // got meanwhile arrives.
    ui.stop(None).await;
    source.cmd(&["SET", "while:stopped", "written-again"]);
    ui.click("btn-start").await;
    ui.wait_displayed("modal-confirm").await;
    ui.click("modal-confirm").await;
    ui.wait_state("INCREMENTAL", SYNC_TIMEOUT).await;
    assert!(
        !ui.displayed("action-error").await,
        "{}",
        ui.text("action-error").await.unwrap_or_default()
    );
    wait_key(&ui, &target, "while:stopped", "written-again").await;

    // Cancel: gone from the list, its checkpoint keys gone from the target,
    // the replicated data kept.
    ui.click("btn-cancel").await;
    ui.wait_displayed("modal-confirm").await;
    ui.click("modal-confirm").await;
    ui.wait("the task list", UI_TIMEOUT, || async {
        let url = ui.url().await?;
        url.ends_with("#/").then_some(()).ok_or(format!("at {url}"))
    })
    .await;
    ui.wait_displayed("flash").await;
    ui.wait_displayed("task-empty").await;
    assert_eq!(
        ui.count("[data-task-id=orders]").await,
        0,
        "task still listed"
    );
    assert_eq!(
        http_request("GET", &http, "/api/v1/tasks/orders").map(|reply| reply.0),
        Some(404),
        "the API still has the task"
    );
    ui.screenshot("9-list-after-cancel").await;
    ui.wait("the checkpoint keys deleted", UI_TIMEOUT, || async {
        let left = checkpoint_keys(&target);
        left.is_empty().then_some(()).ok_or(format!("{left:?}"))
    })
    .await;
    for (key, value) in [
        ("app:0", "value-0".to_string()),
        (
            &format!("app:{}", SEEDED_KEYS - 1),
            format!("value-{}", SEEDED_KEYS - 1),
        ),
        ("late:key", "after-incremental".to_string()),
        ("while:stopped", "written-again".to_string()),
    ] {
        assert_eq!(target.cmd(&["GET", key]), value, "{key} on the target");
    }
    assert_eq!(target.cmd(&["HGET", "app:hash", "f2"]), "v2");

    let Ui { client, ferry, .. } = ui;
    client.close().await.expect("close the browser session");
    drop(ferry);
    println!("dashboard test took {:?}", started.elapsed());
}

/// `SEEDED_KEYS` strings and a hash in the source's db 0.
fn seed_source(source: &RedisServer) {
    let mut args = vec!["MSET".to_string()];
    for i in 0..SEEDED_KEYS {
        args.push(format!("app:{i}"));
        args.push(format!("value-{i}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(source.cmd(&args), "OK");
    source.cmd(&["HSET", "app:hash", "f1", "v1", "f2", "v2"]);
}

/// The target's checkpoint keys of task `orders` (db 0).
fn checkpoint_keys(target: &RedisServer) -> Vec<String> {
    target
        .cmd(&["--scan", "--pattern", "__ferry:checkpoint:orders:*"])
        .lines()
        .map(str::to_string)
        .filter(|key| !key.is_empty())
        .collect()
}

async fn wait_key(ui: &Ui, server: &RedisServer, key: &str, value: &str) {
    let want = if value == "seeded" {
        key.replace("app:", "value-")
    } else {
        value.to_string()
    };
    ui.wait(&format!("{key} on the target"), SYNC_TIMEOUT, || async {
        let got = server.cmd(&["GET", key]);
        (got == want).then_some(()).ok_or(format!("{got:?}"))
    })
    .await;
}

/// Waits until `ferry serve` answers its API, failing early if it exits.
fn wait_for_daemon(ferry: &FerryProcess, http: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, _)) = http_request("GET", http, "/api/v1/tasks") {
            return;
        }
        assert!(
            !ferry.has_exited(),
            "ferry serve exited; {}",
            ferry.log_tail(40)
        );
        assert!(
            Instant::now() < deadline,
            "ferry serve does not answer on {http}; {}",
            ferry.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain HTTP/1.1 request without a body on loopback (chromedriver ignores
/// 1.0): the status and body, or None when nothing answers. The body is read
/// up to its `Content-Length` (chromedriver keeps the connection open), else
/// to the end.
fn http_request(method: &str, addr: &str, path: &str) -> Option<(u16, String)> {
    let socket: SocketAddr = addr.parse().ok()?;
    let mut stream = TcpStream::connect_timeout(&socket, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let read = stream.read(&mut chunk).ok()?;
        reply.extend_from_slice(&chunk[..read]);
        let text = String::from_utf8_lossy(&reply);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            });
            if read == 0 || length.is_some_and(|length| body.len() >= length) {
                let status = head.split_whitespace().nth(1)?.parse().ok()?;
                return Some((status, body.to_string()));
            }
        } else if read == 0 {
            return None;
        }
    }
}

/// The browser binary chromedriver is told to run.
fn find_chromium() -> PathBuf {
    if let Ok(path) = std::env::var("FERRY_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no chromium on PATH: the dashboard test drives a real browser; \
                 install Debian's chromium and chromium-driver (bash tools/setup.sh) \
                 or set FERRY_CHROMIUM"
            )
        })
}

fn screenshot_dir() -> PathBuf {
    let dir = match std::env::var_os("FERRY_SCREENSHOT_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join(format!(
            "ferry-dashboard-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs())
        )),
    };
    std::fs::create_dir_all(&dir).expect("create the screenshot dir");
    dir
}

/// A running chromedriver on a free port, stopped on drop.
struct ChromeDriver {
    child: Child,
    port: u16,
}

impl ChromeDriver {
    fn start(dir: &Path) -> ChromeDriver {
        let bin = std::env::var("FERRY_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = free_port();
        let child = Command::new(&bin)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.join("chromedriver.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run {bin} ({error}): the dashboard test drives a real browser; \
                     install Debian's chromium and chromium-driver (bash tools/setup.sh) \
                     or set FERRY_CHROMEDRIVER"
                )
            });
        let mut driver = ChromeDriver { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let addr = format!("127.0.0.1:{port}");
            if let Some((200, body)) = http_request("GET", &addr, "/status") {
                if body.contains("\"ready\":true") {
                    return driver;
                }
            }
            if let Ok(Some(exit)) = driver.child.try_wait() {
                panic!(
                    "{bin} exited at start ({exit}); see its log in {}",
                    dir.display()
                );
            }
            assert!(Instant::now() < deadline, "{bin} not ready after 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A WebDriver session of a headless Chromium with its own profile in `dir`.
    async fn connect(&self, chromium: &Path, dir: &Path) -> Client {
        let profile = dir.join("chromium-profile");
        let capabilities = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    format!("--window-size={WIDTH},{HEIGHT}"),
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object literal")
        };
        ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "chromedriver could not start {} headless: {error}",
                    chromium.display()
                )
            })
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // SIGTERM first: chromedriver then ends the browsers it started.
        signal(self.child.id(), "TERM");
        if !wait_exit_within(&mut self.child, Duration::from_secs(5)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The browser on the dashboard, with the daemon behind it (for its log when
/// a wait times out).
struct Ui {
    client: Client,
    base: String,
    shots: PathBuf,
    ferry: FerryProcess,
}

impl Ui {
    async fn goto(&self, path: &str) {
        let url = format!("{}{path}", self.base);
        self.client
            .goto(&url)
            .await
            .unwrap_or_else(|error| panic!("open {url}: {error}"));
    }

    async fn url(&self) -> Result<String, String> {
        self.client
            .current_url()
            .await
            .map(|url| url.to_string())
            .map_err(|error| error.to_string())
    }

    async fn element(&self, id: &str) -> Result<Element, String> {
        self.client
            .find(Locator::Id(id))
            .await
            .map_err(|error| format!("#{id}: {error}"))
    }

    /// The rendered text of `#id` (empty when hidden).
    async fn text(&self, id: &str) -> Result<String, String> {
        self.element(id)
            .await?
            .text()
            .await
            .map_err(|error| format!("#{id}: {error}"))
    }

    async fn page_text(&self) -> String {
        match self.text("app").await {
            Ok(text) => text,
            Err(error) => error,
        }
    }

    async fn displayed(&self, id: &str) -> bool {
        match self.element(id).await {
            Ok(element) => element.is_displayed().await.unwrap_or(false),
            Err(_) => false,
        }
    }

    async fn enabled(&self, id: &str) -> bool {
        match self.element(id).await {
            Ok(element) => element.is_enabled().await.unwrap_or(false),
            Err(_) => false,
        }
    }

    async fn count(&self, css: &str) -> usize {
        self.client
            .find_all(Locator::Css(css))
            .await
            .map_or(0, |found| found.len())
    }

    /// Polls `probe` until it gives a value; on timeout, a screenshot of the
    /// page and a panic with the last reason, the page's text and the
    /// daemon's log.
    async fn wait<T, F, Fut>(&self, what: &str, timeout: Duration, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match probe().await {
                Ok(value) => return value,
                Err(reason) => reason,
            };
            if Instant::now() >= deadline {
                self.screenshot("failure").await;
                panic!(
                    "timed out after {timeout:?} waiting for {what}: {last}\npage:\n{}\n{}",
                    self.page_text().await,
                    self.ferry.log_tail(40)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_displayed(&self, id: &str) {
        self.wait(&format!("#{id} shown"), UI_TIMEOUT, || async {
            self.displayed(id)
                .await
                .then_some(())
                .ok_or_else(|| "not shown".to_string())
        })
        .await;
    }

    async fn wait_displayed_css(&self, css: &str) {
        self.wait(&format!("{css} shown"), UI_TIMEOUT, || async {
            let element = self
                .client
                .find(Locator::Css(css))
                .await
                .map_err(|error| error.to_string())?;
            match element.is_displayed().await {
                Ok(true) => Ok(()),
                _ => Err("not shown".to_string()),
            }
        })
        .await;
    }

    async fn wait_enabled(&self, id: &str) {
        self.wait(&format!("#{id} enabled"), UI_TIMEOUT, || async {
            self.enabled(id)
                .await
                .then_some(())
                .ok_or_else(|| "disabled".to_string())
        })
        .await;
    }

    /// Waits until the task page's state badge says `state`.
    async fn wait_state(&self, state: &str, timeout: Duration) {
        self.wait(&format!("state {state}"), timeout, || async {
            let shown = self.text("task-state").await?;
            let error = self.text("task-error").await.unwrap_or_default();
            (shown == state)
                .then_some(())
                .ok_or(format!("state {shown} {error}"))
        })
        .await;
    }

    /// Clicks `#id` once it is shown and enabled (again if the page replaced
    /// it in between).
    async fn click(&self, id: &str) {
        self.wait(&format!("a click on #{id}"), UI_TIMEOUT, || async {
            let element = self.element(id).await?;
            let ready = element.is_displayed().await.unwrap_or(false)
                && element.is_enabled().await.unwrap_or(false);
            if !ready {
                return Err("hidden or disabled".to_string());
            }
            element.click().await.map_err(|error| error.to_string())
        })
        .await;
    }

    /// Clicks the element `css` selects once it is shown.
    async fn click_css(&self, css: &str) {
        self.wait(&format!("a click on {css}"), UI_TIMEOUT, || async {
            let element = self
                .client
                .find(Locator::Css(css))
                .await
                .map_err(|error| error.to_string())?;
            element.click().await.map_err(|error| error.to_string())
        })
        .await;
    }

    /// Stops the task from its page, through the confirmation dialog (a
    /// screenshot of it named `dialog_shot`, if given).
    async fn stop(&self, dialog_shot: Option<&str>) {
        self.click("btn-stop").await;
        self.wait_displayed("modal-confirm").await;
        if let Some(name) = dialog_shot {
            self.screenshot(name).await;
        }
        self.click("modal-confirm").await;
        self.wait_state("STOPPED", UI_TIMEOUT).await;
        self.wait_enabled("btn-start").await;
        assert!(
            !self.displayed("action-error").await,
            "{}",
            self.text("action-error").await.unwrap_or_default()
        );
    }

    /// Replaces the text of the input `#id`.
    async fn fill(&self, id: &str, text: &str) {
        self.wait(&format!("#{id} filled"), UI_TIMEOUT, || async {
            let element = self.element(id).await?;
            element.clear().await.map_err(|error| error.to_string())?;
            element
                .send_keys(text)
                .await
                .map_err(|error| error.to_string())
        })
        .await;
    }

    /// A PNG of the whole page, from its top: the window grows to the
    /// page's height (plus the window's own frame) for it.
    async fn screenshot(&self, name: &str) {
        let height = self
            .client
            .execute(
                "window.scrollTo(0, 0); return document.documentElement.scrollHeight \
                 + Math.max(0, window.outerHeight - window.innerHeight);",
                vec![],
            )
            .await
            .ok()
            .and_then(|height| height.as_u64())
            .map_or(HEIGHT, |height| (height as u32).clamp(HEIGHT, 4000));
        let _ = self.client.set_window_size(WIDTH, height).await;
        let png = self.client.screenshot().await;
        let _ = self.client.set_window_size(WIDTH, HEIGHT).await;
        let path = self.shots.join(format!("{name}.png"));
        match png {
            Ok(png) => {
                std::fs::write(&path, png).expect("write a screenshot");
                println!("screenshot {}", path.display());
            }
            Err(error) => println!("no screenshot {name}: {error}"),
        }
    }
}
