#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine as root:
#   ./scripts/test.sh
# Installs what is missing, checks formatting and lints, then runs every
# test with cargo nextest (one process per test, so each has its own
# SoftHSM2 token directory and its own swtpm).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
source scripts/test-deps.sh
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo build --locked --bins
cargo nextest run --locked --no-fail-fast "$@"
