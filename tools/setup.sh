#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test ferry:
# redis-server/redis-cli 7.0 (sources and targets of the tests), clang and
# libclang-dev (bindgen for the RocksDB bindings), Debian's librocksdb-dev
# (linked instead of compiling RocksDB from source), protobuf-compiler (gRPC),
# chromium and chromium-driver (tests/dashboard.rs drives the web dashboard in
# a real headless browser), prometheus (its promtool checks the /metrics text
# in tests/metrics.rs).
# Idempotent; runs apt-get only when a package is missing.
set -euo pipefail

packages=(redis-server redis-tools clang libclang-dev librocksdb-dev protobuf-compiler pkg-config
          chromium chromium-driver prometheus)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends "${missing[@]}"
    # The Debian package starts a system redis on 6379; ferry's tests and demo
    # start their own servers, so stop it to leave the machine as it was.
    $sudo_cmd service redis-server stop >/dev/null 2>&1 || true
    # Only promtool is wanted from the prometheus package, not its server.
    $sudo_cmd service prometheus stop >/dev/null 2>&1 || true
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "setup: cargo not found; install a Rust toolchain (rustup) first" >&2
        exit 1
    fi
fi
