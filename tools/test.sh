#!/usr/bin/env bash
# The test command (README, and CI through .ci/run): installs what is
# missing, then runs the whole suite: formatting, clippy, unit, property and
# integration tests (integration tests start their own redis-servers on free
# 127.0.0.1 ports and stop them).
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
fi

start=$(date +%s)
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked --no-fail-fast -- --test-threads "${FERRY_TEST_THREADS:-4}"
echo "== all tests passed in $(( $(date +%s) - start ))s"
