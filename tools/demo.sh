#!/usr/bin/env bash
# The README's main command: on a fresh machine, install what is missing,
# build ferry, start two local redis-servers (source and target) on free
# loopback ports, write sample data to the source, move it to the target
# through ferry, and show the result. Everything it starts is stopped on exit.
#
# Today this runs the snapshot path that ferry's wire-format layer provides:
# `ferry rdb fetch` takes the source's dataset through the replication
# protocol (PSYNC, as a replica would), `ferry rdb load` replays it into the
# target. The continuous `ferry sync` joins here when the relay lands.
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

echo "== ferry rdb fetch (snapshot through PSYNC)"
"$ferry" rdb fetch --source "redis://127.0.0.1:$src_port" "$work/snapshot.rdb"
echo "== ferry rdb load (into the target)"
"$ferry" rdb load "$work/snapshot.rdb" --target "redis://127.0.0.1:$dst_port"

echo "== result"
printf '%-8s %-12s %-12s %s\n' side "keys(db0)" "keys(db2)" "digest"
for side in source:$src_port target:$dst_port; do
    port=${side#*:}
    printf '%-8s %-12s %-12s %s\n' "${side%%:*}" \
        "$(redis-cli -p "$port" DBSIZE)" "$(redis-cli -p "$port" -n 2 DBSIZE)" \
        "$(redis-cli -p "$port" DEBUG DIGEST 2>/dev/null || echo n/a)"
done
echo "== sample JSON of the snapshot (first 3 keys)"
"$ferry" rdb dump "$work/snapshot.rdb" --no-aux | head -n 3
