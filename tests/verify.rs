//! `ferry verify` against real redis-servers: equal servers are equal in
//! every mode, each kind of difference is found and named (also inside a big
//! key past its first chunk, and with DEBUG refused so that values are
//! walked), keys in flight settle across passes, the applier's expire grace
//! is allowed for (a target TTL up to the grace longer; a key expired on the
//! source and still on the target within the grace is re-checked and
//! counted as expiring, not as a difference), `__ferry` keys are ignored,
//! `--match` / `--db` / `--qps` are honored, server errors are typed and
//! name key and command, the binary's exit codes and JSON, and the peak RSS
//! of a verify walking a 1M-element list and a 200k-field hash (under
//! `/usr/bin/time -v`; printed with `--nocapture`).
//!
//! Run: `cargo test --test verify` (about 10 s).

mod common;

use std::process::Command as Process;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ferry::ferry_bin;
use common::workload::{cmd, connect, pipeline, SOURCE_ENCODING_CONFIG};
use common::{output_within, RedisServer};
use ferry::redis::command::Command;
use ferry::redis::url::RedisUrl;
use ferry::verify::{
    self, DiffKind, KeyReport, Mode, PassEvent, VerifyConfig, VerifyError, VerifyReport,
};

const NO_DEBUG: &[&str] = &["--enable-debug-command", "no"];

/// Elements of the big list and bytes of the big string: several chunks at
/// the batch and string chunk sizes used here.
const BIG_LIST: usize = 5_000;
const BIG_STRING: usize = 700_000;

fn config(source: &RedisServer, target: &RedisServer) -> VerifyConfig {
    let mut config = VerifyConfig::new(
        RedisUrl::parse(&source.url()).unwrap(),
        RedisUrl::parse(&target.url()).unwrap(),
    );
    config.qps = 0;
    config.pass_interval = Duration::from_millis(100);
    config
}

async fn run(config: &VerifyConfig) -> VerifyReport {
    verify::run(config)
        .await
        .unwrap_or_else(|e| panic!("verify failed: {e}"))
}

async fn apply(server: &RedisServer, cmds: &[Command]) {
    let mut client = connect(server).await;
    pipeline(&mut client, cmds).await;
}

/// A data set of every type, with big keys, in db 0 and db 5.
fn base_data() -> Vec<Command> {
    let mut cmds = vec![
        cmd(&["SELECT", "0"]),
        cmd(&["SET", "str", "hello"]),
        cmd(&["SET", "int", "12345"]),
        cmd(&["SET", "ttl", "v", "EX", "1000"]),
        cmd(&["SET", "bigstr", &"0123456789".repeat(BIG_STRING / 10)]),
        cmd(&["XADD", "stream", "1-0", "a", "1"]),
        cmd(&["XADD", "stream", "2-0", "b", "2"]),
        cmd(&["XADD", "stream", "3-0", "c", "3"]),
        cmd(&["XGROUP", "CREATE", "stream", "g", "0"]),
        cmd(&[
            "XREADGROUP",
            "GROUP",
            "g",
            "alice",
            "COUNT",
            "2",
            "STREAMS",
            "stream",
            ">",
        ]),
        cmd(&["SELECT", "5"]),
        cmd(&["SET", "db5:str", "in db 5"]),
        cmd(&["SELECT", "0"]),
    ];
    for chunk in (0..BIG_LIST).collect::<Vec<_>>().chunks(1000) {
        let mut args = vec!["RPUSH".to_string(), "biglist".to_string()];
        args.extend(chunk.iter().map(|i| format!("item-{i}")));
        cmds.push(cmd(&args));
    }
    let mut hash = vec!["HSET".to_string(), "hash".to_string()];
    let mut set = vec!["SADD".to_string(), "set".to_string()];
    let mut zset = vec!["ZADD".to_string(), "zset".to_string()];
    let mut list = vec!["RPUSH".to_string(), "list".to_string()];
    for i in 0..300 {
        hash.extend([format!("f{i}"), format!("value {i}")]);
        set.push(format!("m{i}"));
        zset.extend([format!("{}.5", i), format!("m{i}")]);
        list.push(format!("e{i}"));
    }
    cmds.extend([cmd(&hash), cmd(&set), cmd(&zset), cmd(&list)]);
    cmds.push(cmd(&["SADD", "intset", "1", "2", "3"]));
    cmds.push(cmd(&["HSET", "smallhash", "a", "1"]));
    cmds
}

/// Servers holding the same data; the source with small-encoding limits so
/// that the two hold it in different encodings.
async fn equal_pair(target_extra: &[&str]) -> (RedisServer, RedisServer) {
    let mut source_args = SOURCE_ENCODING_CONFIG.to_vec();
    source_args.extend_from_slice(target_extra);
    let source = RedisServer::start(&source_args);
    let target = RedisServer::start(target_extra);
    let data = base_data();
    apply(&source, &data).await;
    apply(&target, &data).await;
    (source, target)
}

fn listed<'a>(report: &'a VerifyReport, db: u32, key: &str) -> Option<&'a KeyReport> {
    report
        .differences
        .iter()
        .find(|k| k.db == db && k.key == key)
}

fn assert_equal(report: &VerifyReport, what: &str) {
    assert!(
        report.equal && report.differences_total == 0 && report.differences.is_empty(),
        "{what}: {}",
        verify::render_report(report)
    );
}

#[tokio::test]
async fn equal_servers_are_equal_in_every_mode() {
    let (source, target) = equal_pair(&[]).await;
    for mode in [Mode::Full, Mode::Outline] {
        let mut config = config(&source, &target);
        config.mode = mode;
        config.string_chunk = 64 * 1024;
        let report = run(&config).await;
        assert_equal(&report, mode.name());
        let dbs: Vec<u32> = report.dbs.iter().map(|d| d.db).collect();
        assert_eq!(dbs, vec![0, 5]);
        assert_eq!(report.dbs[0].keys_checked, 12);
        assert_eq!(report.dbs[0].passes, 1);
    }
    // Digests only for small keys: bigger ones are walked even where DEBUG
    // is allowed (many more commands), and still equal.
    let mut config = config(&source, &target);
    let digested = run(&config).await;
    config.digest_max_elements = 100;
    config.digest_max_bytes = 1000;
    let walked = run(&config).await;
    assert_equal(&walked, "walked");
    assert!(
        walked.target_commands > digested.target_commands + 50,
        "{} vs {}",
        walked.target_commands,
        digested.target_commands
    );
}

/// Writes one difference of each kind on top of [`base_data`].
async fn make_differences(source: &RedisServer, target: &RedisServer) {
    apply(
        source,
        &[
            cmd(&["SET", "d:missing", "only here"]),
            cmd(&["SET", "d:type", "a string"]),
            cmd(&["SET", "d:ttl-presence", "v", "EX", "1000"]),
            cmd(&["SET", "d:ttl-far", "v", "EX", "1000"]),
            cmd(&["SET", "d:str", "abc"]),
            cmd(&["RPUSH", "d:len", "a", "b"]),
            cmd(&["SET", "d:same", "same"]),
        ],
    )
    .await;
    apply(
        target,
        &[
            cmd(&["SET", "d:extra", "only there"]),
            cmd(&["RPUSH", "d:type", "a list"]),
            cmd(&["SET", "d:ttl-presence", "v"]),
            cmd(&["SET", "d:ttl-far", "v", "EX", "500"]),
            cmd(&["SET", "d:str", "abd"]),
            cmd(&["RPUSH", "d:len", "a", "b", "c"]),
            cmd(&["SET", "d:same", "same"]),
            cmd(&["HSET", "hash", "f157", "changed"]),
            cmd(&["SREM", "set", "m157"]),
            cmd(&["SADD", "set", "x157"]),
            cmd(&["ZADD", "zset", "99999", "m157"]),
            cmd(&["LSET", "list", "157", "changed"]),
            cmd(&["LSET", "biglist", "4321", "changed"]),
            cmd(&["SETRANGE", "bigstr", "600000", "X"]),
            cmd(&["XDEL", "stream", "2-0"]),
            cmd(&["XADD", "stream", "4-0", "b", "2"]),
        ],
    )
    .await;
}

/// `key` is listed with exactly `kinds` and a detail containing `detail`.
fn assert_named(report: &VerifyReport, key: &str, kinds: &[DiffKind], detail: &str) {
    let found = listed(report, 0, key)
        .unwrap_or_else(|| panic!("{key} not listed:\n{}", verify::render_report(report)));
    assert_eq!(found.kinds, kinds, "{key}: {found:?}");
    assert!(
        found.detail.contains(detail),
        "{key}: {:?} lacks {detail:?}",
        found.detail
    );
}

/// Every difference of [`make_differences`], named, in full mode.
fn assert_every_difference(report: &VerifyReport) {
    use DiffKind::*;
    assert!(!report.equal);
    assert_named(
        report,
        "d:missing",
        &[Missing],
        "missing on the target (string",
    );
    assert_named(
        report,
        "d:extra",
        &[Extra],
        "exists on the target only (string)",
    );
    assert_named(
        report,
        "d:type",
        &[Type],
        "string on the source, list on the target",
    );
    assert_named(report, "d:ttl-presence", &[Ttl], "no TTL on the target");
    assert_named(report, "d:ttl-far", &[Ttl], "ms apart");
    assert_named(report, "d:str", &[Value], "bytes differ from offset 2");
    assert_named(
        report,
        "d:len",
        &[Value],
        "LLEN 2 on the source, 3 on the target",
    );
    assert_named(
        report,
        "hash",
        &[Value],
        "field \"f157\": \"value 157\" on the source, \"changed\"",
    );
    assert_named(
        report,
        "set",
        &[Value],
        "member \"m157\" exists on the source only",
    );
    assert_named(
        report,
        "zset",
        &[Value],
        "member \"m157\": score \"157.5\" on the source, \"99999\" on the target",
    );
    assert_named(
        report,
        "list",
        &[Value],
        "element 157 differs: \"e157\" on the source, \"changed\"",
    );
    assert_named(report, "biglist", &[Value], "element 4321 differs");
    assert_named(
        report,
        "bigstr",
        &[Value],
        "bytes differ from offset 600000",
    );
    assert_named(
        report,
        "stream",
        &[Value],
        "entry \"2-0\" on the source where the target has \"3-0\"",
    );
    assert!(listed(report, 0, "d:same").is_none());
    assert_eq!(
        report.differences_total,
        14,
        "{}",
        verify::render_report(report)
    );
    let db0 = &report.dbs[0];
    assert_eq!(
        (
            db0.missing,
            db0.extra,
            db0.type_,
            db0.ttl,
            db0.value,
            db0.passes
        ),
        (1, 1, 1, 2, 9, 3)
    );
    assert_eq!(db0.differing_after_pass, vec![14, 14, 14]);
    assert_eq!(report.dbs[1].differing_after_pass, vec![0]);
}

#[tokio::test]
async fn each_kind_of_difference_is_found_and_named() {
    let (source, target) = equal_pair(&[]).await;
    make_differences(&source, &target).await;
    let mut full = config(&source, &target);
    full.batch = 100;
    full.string_chunk = 256 * 1024;
    assert_every_difference(&run(&full).await);

    // Outline: everything but the values of equal-length keys.
    let mut outline = full.clone();
    outline.mode = Mode::Outline;
    outline.passes = 1;
    let report = run(&outline).await;
    let names: Vec<&str> = report.differences.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(
        names,
        [
            "d:extra",
            "d:len",
            "d:missing",
            "d:ttl-far",
            "d:ttl-presence",
            "d:type"
        ],
        "{}",
        verify::render_report(&report)
    );
}

#[tokio::test]
async fn a_server_refusing_debug_gets_walked_comparisons() {
    let (source, target) = equal_pair(NO_DEBUG).await;
    let refused = target.cmd(&["DEBUG", "DIGEST-VALUE", "str"]);
    assert!(refused.contains("not allowed"), "{refused}");
    let mut config = config(&source, &target);
    config.string_chunk = 256 * 1024;
    assert_equal(&run(&config).await, "equal data, DEBUG refused");
    make_differences(&source, &target).await;
    assert_every_difference(&run(&config).await);
}

#[tokio::test]
async fn keys_in_flight_settle_across_passes() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    apply(
        &source,
        &[cmd(&["SET", "flight", "new"]), cmd(&["SET", "stuck", "a"])],
    )
    .await;
    apply(
        &target,
        &[cmd(&["SET", "flight", "old"]), cmd(&["SET", "stuck", "b"])],
    )
    .await;
    let mut config = config(&source, &target);
    config.passes = 3;
    config.pass_interval = Duration::from_millis(300);
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let target_port = target.port.to_string();
    let mut observer = move |event: &PassEvent| {
        seen.lock().unwrap().push(event.clone());
        if event.pass == 1 {
            // The writer catches up while verify waits for pass 2.
            let out = output_within(
                Process::new(common::redis_cli_bin()).args([
                    "-p",
                    &target_port,
                    "SET",
                    "flight",
                    "new",
                ]),
                Duration::from_secs(10),
            )
            .expect("redis-cli");
            assert!(out.status.success());
        }
    };
    let report = verify::run_observed(&config, &mut observer)
        .await
        .expect("verify");
    assert_eq!(report.dbs[0].differing_after_pass, vec![2, 1, 1]);
    assert_eq!(report.dbs[0].passes, 3);
    let names: Vec<&str> = report.differences.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(names, ["stuck"]);
    let passes: Vec<(u32, u64, bool)> = events
        .lock()
        .unwrap()
        .iter()
        .map(|e| (e.pass, e.differing, e.another_pass))
        .collect();
    assert_eq!(passes, [(1, 2, true), (2, 1, true), (3, 1, false)]);

    // Once the stuck key is fixed too, the second pass finds nothing and
    // the db stops there.
    target.cmd(&["SET", "flight", "old"]);
    let stuck = target.port.to_string();
    let mut fix_all = move |event: &PassEvent| {
        if event.pass == 1 {
            for (key, value) in [("flight", "new"), ("stuck", "a")] {
                let out = output_within(
                    Process::new(common::redis_cli_bin()).args(["-p", &stuck, "SET", key, value]),
                    Duration::from_secs(10),
                )
                .expect("redis-cli");
                assert!(out.status.success());
            }
        }
    };
    let report = verify::run_observed(&config, &mut fix_all)
        .await
        .expect("verify");
    assert_equal(&report, "after the writer caught up");
    assert_eq!(report.dbs[0].differing_after_pass, vec![2, 0]);
    assert_eq!(report.dbs[0].passes, 2);
}

#[tokio::test]
async fn ferry_internal_keys_are_ignored() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    apply(
        &source,
        &[
            cmd(&["SET", "k", "v"]),
            cmd(&["SET", "__ferry:heartbeat", "1"]),
        ],
    )
    .await;
    apply(
        &target,
        &[
            cmd(&["SET", "k", "v"]),
            cmd(&["HSET", "__ferry:checkpoint", "offset", "42"]),
            cmd(&["SELECT", "3"]),
            cmd(&["SET", "__ferry_other", "x"]),
        ],
    )
    .await;
    let report = run(&config(&source, &target)).await;
    assert_equal(&report, "internal keys");
    let checked: Vec<(u32, u64)> = report.dbs.iter().map(|d| (d.db, d.keys_checked)).collect();
    assert_eq!(checked, [(0, 1), (3, 0)]);
}

#[tokio::test]
async fn match_and_db_are_honored() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    apply(
        &source,
        &[
            cmd(&["SET", "a:1", "x"]),
            cmd(&["SET", "b:1", "x"]),
            cmd(&["SELECT", "2"]),
            cmd(&["SET", "a:2", "x"]),
        ],
    )
    .await;
    apply(
        &target,
        &[
            cmd(&["SET", "a:1", "y"]),
            cmd(&["SET", "b:1", "y"]),
            cmd(&["SELECT", "2"]),
            cmd(&["SET", "a:2", "y"]),
            cmd(&["SELECT", "7"]),
            cmd(&["SET", "a:7", "only on the target"]),
        ],
    )
    .await;
    let mut config = config(&source, &target);
    config.passes = 1;
    let everything = run(&config).await;
    let found: Vec<(u32, &str)> = everything
        .differences
        .iter()
        .map(|k| (k.db, k.key.as_str()))
        .collect();
    assert_eq!(found, [(0, "a:1"), (0, "b:1"), (2, "a:2"), (7, "a:7")]);

    config.dbs = vec![0];
    config.pattern = Some("a:*".into());
    let narrowed = run(&config).await;
    let found: Vec<(u32, &str)> = narrowed
        .differences
        .iter()
        .map(|k| (k.db, k.key.as_str()))
        .collect();
    assert_eq!(found, [(0, "a:1")]);
    assert_eq!(narrowed.dbs.len(), 1);
    assert_eq!(narrowed.dbs[0].keys_checked, 1);

    config.dbs = vec![2, 7];
    let found: Vec<(u32, String)> = run(&config)
        .await
        .differences
        .into_iter()
        .map(|k| (k.db, k.key))
        .collect();
    assert_eq!(found, [(2, "a:2".to_string()), (7, "a:7".to_string())]);
}

/// One sync's keyspace on a shared target: each source db against the
/// target db it maps to, only the keys of the key filter on both sides
/// (the target's other keys are another sync's, not extra).
#[tokio::test]
async fn a_db_map_and_a_key_filter_narrow_the_comparison() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    apply(
        &source,
        &[
            cmd(&["SET", "a:1", "x"]),
            cmd(&["SET", "a:tmp:1", "not owned"]),
            cmd(&["SET", "b:1", "not owned"]),
            cmd(&["SELECT", "5"]),
            cmd(&["SET", "a:5", "x"]),
        ],
    )
    .await;
    apply(
        &target,
        &[
            cmd(&["SELECT", "3"]),
            cmd(&["SET", "a:1", "x"]),
            cmd(&["SET", "b:1", "another sync's"]),
            cmd(&["SET", "c:1", "another sync's"]),
            cmd(&["SELECT", "6"]),
            cmd(&["SET", "a:5", "different"]),
            cmd(&["SET", "a:6", "extra"]),
        ],
    )
    .await;
    let mut config = config(&source, &target);
    config.passes = 1;
    config.db_map = vec![(0, 3), (5, 6)];
    config.key_filter = Some(ferry::apply::keyspace::KeyFilter::new(
        vec!["a:".into()],
        vec!["a:tmp:".into()],
    ));
    let report = run(&config).await;
    let found: Vec<(u32, &str, Vec<DiffKind>)> = report
        .differences
        .iter()
        .map(|k| (k.db, k.key.as_str(), k.kinds.clone()))
        .collect();
    assert_eq!(
        found,
        [
            (5, "a:5", vec![DiffKind::Value]),
            (5, "a:6", vec![DiffKind::Extra])
        ]
    );
    let dbs: Vec<(u32, u32, u64)> = report
        .dbs
        .iter()
        .map(|d| (d.db, d.target_db, d.keys_checked))
        .collect();
    assert_eq!(dbs, [(0, 3, 1), (5, 6, 2)]);
    // --db picks among the mapped dbs.
    config.dbs = vec![0];
    let report = run(&config).await;
    assert!(report.equal, "{report:?}");
    assert_eq!(report.dbs.len(), 1);
}

#[tokio::test]
async fn qps_limits_the_command_rate() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let mut data = Vec::new();
    for i in 0..100 {
        data.push(cmd(&["SET", &format!("k{i}"), "v"]));
    }
    apply(&source, &data).await;
    apply(&target, &data).await;
    let mut config = config(&source, &target);
    config.mode = Mode::Outline;
    config.qps = 250;
    let started = Instant::now();
    let limited = run(&config).await;
    let limited_time = started.elapsed();
    assert_equal(&limited, "limited");
    // 100 keys: TYPE + PTTL + STRLEN each, the target's keys looked up with
    // EXISTS, plus SCANs: about 400 commands to the source.
    assert!(
        limited.source_commands >= 400,
        "{}",
        limited.source_commands
    );
    let floor = Duration::from_secs_f64((limited.source_commands as f64 - 13.0) / 250.0 * 0.9);
    assert!(
        limited_time >= floor,
        "{limited_time:?} < {floor:?} for {} commands",
        limited.source_commands
    );

    config.qps = 0;
    let started = Instant::now();
    assert_equal(&run(&config).await, "unlimited");
    let unlimited_time = started.elapsed();
    assert!(
        unlimited_time * 2 < limited_time,
        "{unlimited_time:?} vs {limited_time:?}"
    );
}

#[tokio::test]
async fn server_errors_are_typed_and_name_key_and_command() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[
        "--enable-debug-command",
        "no",
        "--rename-command",
        "SMISMEMBER",
        "",
    ]);
    let data = [cmd(&["SADD", "some:set", "a", "b"])];
    apply(&source, &data).await;
    apply(&target, &data).await;
    let error = verify::run(&config(&source, &target))
        .await
        .expect_err("SMISMEMBER is gone");
    match &error {
        VerifyError::Server { command, at, .. } => {
            assert_eq!(command, "SMISMEMBER", "{error}");
            assert_eq!(at, "db 0, key \"some:set\"", "{error}");
        }
        other => panic!("{other}"),
    }
    assert!(
        error.to_string().starts_with(
            "the target refused SMISMEMBER (db 0, key \"some:set\"): ERR unknown command"
        ),
        "{error}"
    );
}

/// Unix ms now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .expect("clock after 1970")
}

/// The default grace, as the applier writes it.
const GRACE_MS: i64 = 300_000;

/// A source and a target as ferry leaves them with the default grace, plus
/// keys the grace does not explain.
async fn graced_pair() -> (RedisServer, RedisServer) {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let at = now_ms() + 3_600_000;
    let px_at = |ms: i64| ms.to_string();
    apply(
        &source,
        &[
            cmd(&["SET", "g:graced", "v", "PXAT", &px_at(at)]),
            cmd(&["SET", "g:late", "v", "PXAT", &px_at(at)]),
            cmd(&["SET", "g:early", "v", "PXAT", &px_at(at)]),
        ],
    )
    .await;
    apply(
        &target,
        &[
            // The source's deadline plus the grace: equal.
            cmd(&["SET", "g:graced", "v", "PXAT", &px_at(at + GRACE_MS)]),
            // Later than the grace allows, or earlier: differences.
            cmd(&["SET", "g:late", "v", "PXAT", &px_at(at + GRACE_MS + 60_000)]),
            cmd(&["SET", "g:early", "v", "PXAT", &px_at(at - 60_000)]),
            // Expired on the source, kept by the grace: expiring.
            cmd(&["SET", "g:expiring", "v", "PX", "60000"]),
            // On the target only, beyond the grace: extra.
            cmd(&["SET", "g:extra", "v", "PX", "3600000"]),
        ],
    )
    .await;
    (source, target)
}

#[tokio::test]
async fn the_expire_grace_is_allowed_for() {
    let (source, target) = graced_pair().await;
    let mut config = config(&source, &target);
    config.passes = 2;
    assert_eq!(config.expire_grace_ms, GRACE_MS as u64, "the default");
    let report = run(&config).await;
    let names: Vec<&str> = report.differences.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(names, ["g:early", "g:extra", "g:late"], "{report:?}");
    let kinds = |key: &str| listed(&report, 0, key).map(|k| k.kinds.clone());
    assert_eq!(kinds("g:early"), Some(vec![DiffKind::Ttl]));
    assert_eq!(kinds("g:late"), Some(vec![DiffKind::Ttl]));
    assert_eq!(kinds("g:extra"), Some(vec![DiffKind::Extra]));
    assert!(
        listed(&report, 0, "g:late")
            .is_some_and(|k| k.detail.contains("later") && k.detail.contains("grace")),
        "{report:?}"
    );
    let db = &report.dbs[0];
    // The expiring key was re-checked with the differences, then set apart.
    assert_eq!(db.differing_after_pass, vec![4, 4]);
    assert_eq!((db.expiring, db.extra, db.ttl), (1, 1, 2));
    assert!(
        verify::render_report(&report).contains("1 keys on the target only are expiring"),
        "{}",
        verify::render_report(&report)
    );

    // Without the grace, the graced key and the expiring one differ.
    config.expire_grace_ms = 0;
    let strict = run(&config).await;
    let names: Vec<&str> = strict.differences.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(
        names,
        ["g:early", "g:expiring", "g:extra", "g:graced", "g:late"]
    );
    assert_eq!(
        listed(&strict, 0, "g:expiring").map(|k| k.kinds.clone()),
        Some(vec![DiffKind::Extra])
    );
    assert_eq!(strict.dbs[0].expiring, 0);
}

#[tokio::test]
async fn an_expiring_key_settles_like_lag_once_the_del_arrives() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    apply(&source, &[cmd(&["SET", "same", "v"])]).await;
    apply(
        &target,
        &[
            cmd(&["SET", "same", "v"]),
            cmd(&["SET", "expired", "v", "PX", "120000"]),
        ],
    )
    .await;
    let mut config = config(&source, &target);
    config.passes = 3;
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let target_port = target.port.to_string();
    let mut observer = move |event: &PassEvent| {
        seen.lock().unwrap().push((event.pass, event.differing));
        if event.pass == 1 {
            // The source's DEL reaches the target between the passes.
            let out = output_within(
                Process::new(common::redis_cli_bin()).args(["-p", &target_port, "DEL", "expired"]),
                Duration::from_secs(10),
            )
            .expect("redis-cli");
            assert!(out.status.success());
        }
    };
    let report = verify::run_observed(&config, &mut observer)
        .await
        .expect("verify");
    assert_equal(&report, "the DEL arrived");
    assert_eq!(report.dbs[0].differing_after_pass, vec![1, 0]);
    assert_eq!(report.dbs[0].expiring, 0);
    assert_eq!(*events.lock().unwrap(), [(1, 1), (2, 0)]);
}

#[tokio::test]
async fn the_binary_allows_for_the_default_grace() {
    let (source, target) = graced_pair().await;
    for key in ["g:late", "g:early", "g:extra"] {
        target.cmd(&["DEL", key]);
        source.cmd(&["DEL", key]);
    }
    let verify = |extra: &[&str]| {
        let mut process = Process::new(ferry_bin());
        process
            .args([
                "verify",
                "--source",
                &source.url(),
                "--target",
                &target.url(),
                "--json",
                "--passes",
                "2",
                "--pass-interval",
                "50",
            ])
            .args(extra);
        output_within(&mut process, Duration::from_secs(60)).expect("ferry verify")
    };
    let graced = verify(&[]);
    let json: serde_json::Value = serde_json::from_slice(&graced.stdout).expect("one JSON object");
    assert_eq!(graced.status.code(), Some(0), "{json}");
    assert_eq!(json["equal"], true, "{json}");
    assert_eq!(json["dbs"][0]["expiring"], 1, "{json}");

    let strict = verify(&["--expire-grace", "0s"]);
    let json: serde_json::Value = serde_json::from_slice(&strict.stdout).expect("one JSON object");
    assert_eq!(strict.status.code(), Some(1), "{json}");
    assert_eq!(json["differences_total"], 2, "{json}");
    assert_eq!(
        (
            json["dbs"][0]["ttl"].as_u64(),
            json["dbs"][0]["extra"].as_u64()
        ),
        (Some(1), Some(1)),
        "{json}"
    );
}

#[tokio::test]
async fn the_binary_reports_and_exits_by_outcome() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let data = [cmd(&["SET", "same", "v"])];
    apply(&source, &data).await;
    apply(&target, &data).await;
    let verify = |extra: &[&str]| {
        let mut process = Process::new(ferry_bin());
        process
            .args([
                "verify",
                "--source",
                &source.url(),
                "--target",
                &target.url(),
                "--passes",
                "2",
                "--pass-interval",
                "50",
            ])
            .args(extra);
        output_within(&mut process, Duration::from_secs(60)).expect("ferry verify")
    };
    let equal = verify(&[]);
    let stdout = String::from_utf8_lossy(&equal.stdout);
    assert_eq!(equal.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(
            "| Db | Keys Checked | Missing | Extra | Type | TTL | Value | Expiring | Passes | Time (ms) |"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("equal: 1 keys checked, no difference"),
        "{stdout}"
    );

    // A key that is not UTF-8, missing on the target.
    let mut client = connect(&source).await;
    client
        .call([&b"SET"[..], &b"bin\xff\x00"[..], &b"v"[..]])
        .await
        .expect("SET");
    let differ = verify(&["--json"]);
    assert_eq!(differ.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&differ.stdout).expect("one JSON object");
    assert_eq!(json["equal"], false);
    assert_eq!(json["differences_total"], 1);
    assert_eq!(json["differences"][0]["key"], "bin\\xff\\x00");
    assert_eq!(json["differences"][0]["kinds"][0], "missing");
    assert_eq!(json["dbs"][0]["missing"], 1);
    assert_eq!(
        json["dbs"][0]["differing_after_pass"],
        serde_json::json!([1, 1])
    );
    assert!(String::from_utf8_lossy(&differ.stderr).contains("1 keys differ"));

    let gone = {
        let mut process = Process::new(ferry_bin());
        process.args([
            "verify",
            "--source",
            &source.url(),
            "--target",
            "redis://127.0.0.1:1",
        ]);
        output_within(&mut process, Duration::from_secs(60)).expect("ferry verify")
    };
    assert_eq!(gone.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(
        stderr.contains("cannot connect to the target redis://127.0.0.1:1"),
        "{stderr}"
    );

    // Something that is not Redis answers on the target's port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let talker = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut socket, _) = listener.accept().expect("accept");
        let mut request = [0u8; 256];
        let _ = socket.read(&mut request);
        let _ = socket.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let garbled = {
        let mut process = Process::new(ferry_bin());
        process.args([
            "verify",
            "--source",
            &source.url(),
            "--target",
            &format!("redis://127.0.0.1:{port}"),
        ]);
        output_within(&mut process, Duration::from_secs(60)).expect("ferry verify")
    };
    talker.join().expect("talker");
    assert_eq!(garbled.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&garbled.stderr);
    assert!(
        stderr.contains("lost the target connection during DEBUG: invalid RESP at byte 0"),
        "{stderr}"
    );
}

/// Peak RSS of a `ferry verify` walking a 1M-element list, a 200k-field
/// hash and a list of forty 2 MB elements stays small: values are compared
/// chunk by chunk, and chunks of big elements hold fewer of them. The target
/// refuses DEBUG, so every value is walked.
#[tokio::test]
async fn big_keys_are_walked_in_bounded_memory() {
    const FILL: &str = "for i = 1, 1000000 do redis.call('RPUSH', KEYS[1], 'element-' .. i) end \
        for i = 1, 200000 do redis.call('HSET', KEYS[2], 'field-' .. i, 'value-' .. i) end \
        local fat = string.rep('x', 2000000) \
        for i = 1, 40 do redis.call('RPUSH', KEYS[3], fat .. i) end \
        return redis.call('LLEN', KEYS[1])";
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(NO_DEBUG);
    for server in [&source, &target] {
        assert_eq!(
            server.cmd(&["EVAL", FILL, "3", "biglist", "bighash", "fatlist"]),
            "1000000"
        );
    }
    let mut process = Process::new("/usr/bin/time");
    process.args([
        "-v",
        ferry_bin(),
        "verify",
        "--source",
        &source.url(),
        "--target",
        &target.url(),
        "--qps",
        "0",
        "--passes",
        "1",
    ]);
    let out = output_within(&mut process, Duration::from_secs(120))
        .expect("/usr/bin/time -v ferry verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("equal: 3 keys checked"), "{stdout}");
    let peak_kib: u64 = stderr
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {stderr}"));
    eprintln!("ferry verify peak RSS: {peak_kib} KiB");
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");
}

/// A native replica of a source holding every type × encoding (streams with
/// consumer groups, TTLs, several dbs) is equal to it in every mode, with
/// and without the digest fast path: no false positives on real data.
#[tokio::test]
async fn a_native_replica_is_equal_to_its_source() {
    let source = RedisServer::start(SOURCE_ENCODING_CONFIG);
    let replica = RedisServer::start(&[]);
    common::workload::fill_source(&mut connect(&source).await, false).await;
    replica.cmd(&["REPLICAOF", "127.0.0.1", &source.port.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let caught_up = replica.info_field("master_link_status").as_deref() == Some("up")
            && replica.info_field("slave_repl_offset") == source.info_field("master_repl_offset");
        if caught_up {
            break;
        }
        assert!(Instant::now() < deadline, "the replica did not catch up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut config = config(&source, &replica);
    for (mode, digest_max_elements) in [(Mode::Full, 10_000), (Mode::Full, 0), (Mode::Outline, 0)] {
        config.mode = mode;
        config.digest_max_elements = digest_max_elements;
        config.digest_max_bytes = digest_max_elements;
        let report = run(&config).await;
        assert_equal(
            &report,
            &format!("{} digest<={digest_max_elements}", mode.name()),
        );
        let dbs: Vec<u32> = report.dbs.iter().map(|d| d.db).collect();
        assert_eq!(dbs, [0, 3, 15]);
    }
}
