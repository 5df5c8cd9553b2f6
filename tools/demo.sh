#!/usr/bin/env bash
# The README's main command: on a fresh machine, install what is missing,
# build ferry, start two local redis-servers (source and target) on free
# loopback ports, write sample data to the source, move it to the target
# continuously through `ferry sync`, and show its status. Everything it starts is stopped on exit.
#
# `ferry sync` runs a listener and its applier in one process (one RocksDB
# WAL under a data dir): a full sync first, then the live stream.
# The demo writes data before and while it runs, then shows `ferry status`.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== building ferry (release)"
cargo build --release --quiet
ferry="${CARGO_TARGET_DIR:-target}/release/ferry"

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_redis() { # name port
    mkdir -p "$work/$1"
    redis-server --port "$2" --bind 127.0.0.1 --dir "$work/$1" --save "" --appendonly no \
        --logfile "$work/$1/redis.log" --daemonize no --enable-debug-command local \
        --repl-diskless-sync-delay 0 >/dev/null 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        [ "$(redis-cli -p "$2" PING 2>/dev/null)" = "PONG" ] && return 0
        sleep 0.1
    done
    echo "redis-server $1 did not start; log: $work/$1/redis.log" >&2
    exit 1
}

src_port=$(free_port); start_redis source "$src_port"
dst_port=$(free_port); start_redis target "$dst_port"
echo "== source redis on 127.0.0.1:$src_port, target redis on 127.0.0.1:$dst_port"

echo "== writing sample data to the source"
{
    for i in $(seq 1 20000); do echo "SET user:$i name-$i"; done
    for i in $(seq 1 500); do echo "RPUSH events e$i"; done
    echo "HSET profile:1 name ada lang rust city london"
    echo "ZADD leaderboard 100 ada 95 grace 90 linus"
    echo "SADD tags redis rust replication"
    echo "XADD orders * item book qty 1"
    echo "SET session:abc token EX 3600"
    echo "SELECT 2"
    echo "INCRBY counter 42"
} | redis-cli -p "$src_port" >/dev/null

echo "== ferry sync (data dir $work/sync)"
"$ferry" sync --source "redis://127.0.0.1:$src_port" --target "redis://127.0.0.1:$dst_port" \
    --data-dir "$work/sync" --admin 127.0.0.1:0 2>"$work/ferry.log" &
pids+=($!)

wait_target() { # key value what
    for _ in $(seq 600); do
        [ "$(redis-cli -p "$dst_port" GET "$1")" = "$2" ] && return 0
        sleep 0.1
    done
    echo "the target did not get $3 within 60 s; ferry's log:" >&2
    tail -n 30 "$work/ferry.log" >&2
    exit 1
}
wait_target user:20000 name-20000 "the full sync"
echo "== full sync done; writing live data to the source (streamed)"
{
    for i in $(seq 1 1000); do echo "INCR live:counter"; done
    for i in $(seq 1 200); do echo "LPUSH live:list $i"; done
    echo "MULTI"; echo "INCR tx:a"; echo "INCR tx:b"; echo "EXEC"
    echo "DEL user:1"
    echo "SET demo:sentinel done"
} | redis-cli -p "$src_port" >/dev/null

wait_target demo:sentinel done "the live writes"
sleep 1.5 # one heartbeat, so the latency columns have a recent sample

echo "== ferry status"
"$ferry" status --data-dir "$work/sync"

echo "== result (the target also holds ferry's checkpoint key __ferry:checkpoint:ferry:0)"
printf '%-8s %-10s %-10s %-14s %s\n' side "keys(db0)" "keys(db2)" "live:counter" "user:1"
for side in source:$src_port target:$dst_port; do
    port=${side#*:}
    printf '%-8s %-10s %-10s %-14s %s\n' "${side%%:*}" \
        "$(redis-cli -p "$port" DBSIZE)" "$(redis-cli -p "$port" -n 2 DBSIZE)" \
        "$(redis-cli -p "$port" GET live:counter)" "$(redis-cli -p "$port" EXISTS user:1)"
done
echo "== ferry's log: $work/ferry.log (removed on exit); the last lines:"
tail -n 5 "$work/ferry.log" | cut -c1-200
