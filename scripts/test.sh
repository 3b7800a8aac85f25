#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine as root:
#   ./scripts/test.sh
# Installs what is missing, checks formatting, lints and the supply chain
# (cargo-deny, deny.toml), then runs every test with cargo nextest (one
# process per test, so each has its own SoftHSM2 token directory and its own
# swtpm), then each fuzz target for 10 s (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
source scripts/test-deps.sh
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo deny --locked check --hide-inclusion-graph licenses bans sources
# The RustSec advisory database cannot be fetched on these machines: check
# advisories only against a local copy (cargo-deny keeps it under
# $CARGO_HOME/advisory-dbs/), never fetching.
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
if compgen -G "$cargo_home/advisory-dbs/*/crates" >/dev/null || compgen -G "$cargo_home/advisory-db*/crates" >/dev/null; then
  cargo deny --offline --locked check --hide-inclusion-graph advisories
else
  echo "test: NOTICE: skipping \`cargo deny check advisories\`: no local advisory database under" \
    "$cargo_home/advisory-dbs (run \`cargo deny fetch\` where the network allows)" >&2
fi
cargo build --locked --bins
cargo nextest run --locked --no-fail-fast "$@"
./scripts/fuzz.sh 10
