//! Parse throughput of the streaming RDB parser and of the RESP decoder.
//!
//! `rdb_parse/keys=1000000`: a dump written by a real redis-server
//! (`DEBUG POPULATE 1000000 key 100`, then `SAVE`), generated once into the
//! system temp dir (`ferry-bench-populate-1000000.rdb`) and parsed from
//! memory, so the figure is the parser's, not the disk's.
//! `resp_decode/commands=100000`: a buffer of pipelined `SET` commands
//! decoded frame by frame.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry::redis::rdb::{ParseOptions, RdbEvent, RdbParser};
use ferry::redis::resp::{encode_command, RespDecoder, RespLimits};

const KEYS: u64 = 1_000_000;

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Writes the populated dump with a throwaway redis-server, once.
fn populated_dump() -> PathBuf {
    let path = std::env::temp_dir().join(format!("ferry-bench-populate-{KEYS}.rdb"));
    if path.exists() {
        return path;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let mut server = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--enable-debug-command", "yes", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    let deadline = Instant::now() + Duration::from_secs(20);
    while redis_cli(port, &["PING"]) != "PONG" {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        redis_cli(
            port,
            &["DEBUG", "POPULATE", &KEYS.to_string(), "key", "100"]
        ),
        "OK"
    );
    assert_eq!(redis_cli(port, &["SAVE"]), "OK");
    let _ = server.kill();
    let _ = server.wait();
    std::fs::copy(dir.path().join("dump.rdb"), &path).expect("copy dump");
    path
}

fn parse(data: &[u8]) -> u64 {
    let mut parser = RdbParser::new(data, ParseOptions::default());
    let mut keys = 0;
    while let Some(event) = parser.next_event().expect("dump parses") {
        if matches!(event, RdbEvent::KeyStart(_)) {
            keys += 1;
        }
    }
    keys
}

fn rdb_parse(c: &mut Criterion) {
    let data = std::fs::read(populated_dump()).expect("read dump");
    // Keys per second, from one timed pass (criterion reports bytes/s).
    let start = Instant::now();
    let keys = parse(&data);
    let elapsed = start.elapsed();
    assert_eq!(keys, KEYS);
    eprintln!(
        "rdb_parse: {keys} keys, {} bytes in {elapsed:?}: {:.0} keys/s, {:.1} MiB/s",
        data.len(),
        keys as f64 / elapsed.as_secs_f64(),
        data.len() as f64 / elapsed.as_secs_f64() / (1024.0 * 1024.0)
    );
    let mut group = c.benchmark_group("rdb_parse");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function(format!("keys={KEYS}"), |b| b.iter(|| parse(&data)));
    group.finish();
}

fn resp_decode(c: &mut Criterion) {
    const COMMANDS: usize = 100_000;
    let mut wire = BytesMut::new();
    for i in 0..COMMANDS {
        let key = format!("key:{i:08}");
        encode_command(&[b"SET".as_ref(), key.as_bytes(), &[b'v'; 100]], &mut wire);
    }
    let wire = wire.freeze();
    let mut group = c.benchmark_group("resp_decode");
    group.throughput(Throughput::Bytes(wire.len() as u64));
    group.bench_function(format!("commands={COMMANDS}"), |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            let mut decoder = RespDecoder::new(RespLimits::default());
            let mut frames = 0;
            while let Some(_frame) = decoder.decode_frame(&mut buf).expect("valid RESP") {
                frames += 1;
            }
            assert_eq!(frames, COMMANDS);
        })
    });
    group.finish();
}

criterion_group!(benches, rdb_parse, resp_decode);
criterion_main!(benches);
