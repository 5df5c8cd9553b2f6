#!/usr/bin/env bash
# The test command (README, and CI through .ci/run): installs what is
# missing, then runs the whole suite: formatting, clippy, unit, property and
# integration tests (integration tests start their own redis-servers on free
# 127.0.0.1 ports and stop them), then the RDB conformance suite.
#
# The conformance suite (tests/rdb_corpus.rs) reads a public RDB fixture
# corpus that is not part of the repository: the directory FERRY_RDB_CORPUS
# names. When FERRY_RDB_CORPUS is set, the corpus must be there (a missing
# one fails the run; .ci/run sets it); when it is not set, ../shared/fixtures/rdb
# is used if it exists, and otherwise the suite is reported as not run.
#
# Build outputs are reused between runs: in CI (CI=true) the target dir lives
# outside the fresh clone, in /var/cache/ferry/target, unless CARGO_TARGET_DIR
# is set.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

if [ -z "${CARGO_TARGET_DIR:-}" ] && [ "${CI:-}" = "true" ]; then
    export CARGO_TARGET_DIR=/var/cache/ferry/target
    mkdir -p "$CARGO_TARGET_DIR"
    # A fresh clone rebuilds ferry itself anyway: incremental state only grows.
    export CARGO_INCREMENTAL=0
    rm -rf "$CARGO_TARGET_DIR/debug/incremental"
fi
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
    mkdir -p "$CARGO_TARGET_DIR"
    free_kib=$(df -Pk "$CARGO_TARGET_DIR" | awk 'NR==2 {print $4}')
    if [ "${free_kib:-0}" -lt $((4 * 1024 * 1024)) ]; then
        echo "only $((free_kib / 1024)) MiB free under $CARGO_TARGET_DIR: the build needs about 4 GiB" >&2
        df -h "$CARGO_TARGET_DIR" >&2
        exit 1
    fi
fi

if [ -n "${FERRY_RDB_CORPUS:-}" ]; then
    if [ ! -f "$FERRY_RDB_CORPUS/INDEX.tsv" ]; then
        echo "FERRY_RDB_CORPUS=$FERRY_RDB_CORPUS holds no INDEX.tsv: the RDB conformance suite cannot run" >&2
        exit 1
    fi
elif [ -f ../shared/fixtures/rdb/INDEX.tsv ]; then
    FERRY_RDB_CORPUS="$(cd ../shared/fixtures/rdb && pwd)"
fi
export FERRY_RDB_CORPUS="${FERRY_RDB_CORPUS:-}"

start=$(date +%s)
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked --no-fail-fast -- --test-threads "${FERRY_TEST_THREADS:-4}"
if [ -n "$FERRY_RDB_CORPUS" ]; then
    echo "== RDB conformance suite (FERRY_RDB_CORPUS=$FERRY_RDB_CORPUS)"
    cargo test --locked --test rdb_corpus -- --ignored --test-threads "${FERRY_TEST_THREADS:-4}"
else
    echo "== RDB conformance suite NOT RUN: no corpus (set FERRY_RDB_CORPUS=DIR to run it)"
fi
echo "== all tests passed in $(( $(date +%s) - start ))s"
