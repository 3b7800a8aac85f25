#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for a bounded time:
#   ./scripts/fuzz.sh            # 10 s per target (what test.sh runs)
#   ./scripts/fuzz.sh 600        # the long run (docs/reliability.md)
#   FUZZ_TARGETS="name apikey" ./scripts/fuzz.sh 60
# Prints executions and crashes per target; exits 1 when any target found a
# crash (the reproducer is in fuzz/artifacts/<target>/; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a -s none <target> <file>).
#
# Stable Rust with RUSTC_BOOTSTRAP=1 (cargo-fuzz wants nightly flags).
# Release code with debug assertions and overflow checks (-O -a), so an
# arithmetic overflow is a crash. No sanitizer by default: the fuzzed code
# is safe Rust and ASan halves the execution rate; FUZZ_SANITIZER=address
# to turn it on. The committed seeds (fuzz/corpus/<target>/) are only read;
# what libFuzzer learns goes to fuzz/target/corpus/<target>/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-10}"
targets=(${FUZZ_TARGETS:-name config policy apikey proxy_rules audit_bundle proxy_authority proxy_request grpc_messages})
san="${FUZZ_SANITIZER:-none}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is missing: cargo install --locked cargo-fuzz" >&2
  exit 2
fi

flags=(-O -a -s "$san")
echo "fuzz: building ${targets[*]} (sanitizer: $san)" >&2
cargo fuzz build "${flags[@]}" >&2

work=fuzz/target/corpus
logs=fuzz/target/logs
mkdir -p "$logs"
failed=0
printf '%-14s %12s %10s %8s %s\n' target executions exec/s crashes note
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "fuzz/corpus/$t" "fuzz/artifacts/$t"
  before=$(find "fuzz/artifacts/$t" -type f | wc -l)
  log="$logs/$t.log"
  rc=0
  cargo fuzz run "${flags[@]}" "$t" "$work/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 -max_len=8192 \
    -timeout=10 -rss_limit_mb=2048 >"$log" 2>&1 || rc=$?
  after=$(find "fuzz/artifacts/$t" -type f | wc -l)
  crashes=$((after - before))
  # libFuzzer's final stats; a crashed run has none, so fall back to the
  # last status line (`#N  ...`).
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  [ -n "$runs" ] || runs=$(sed -n 's/^#\([0-9][0-9]*\)[[:space:]].*/\1/p' "$log" | tail -1)
  runs=${runs:-0}
  note=""
  if ((rc != 0)); then
    ((crashes > 0)) || crashes=1
    art=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    note="exit $rc; ${art:-see $log}"
    failed=1
  fi
  printf '%-14s %12s %10s %8s %s\n' "$t" "$runs" "$((runs / (secs > 0 ? secs : 1)))" "$crashes" "$note"
done
# The config, audit_bundle and grpc_messages targets keep their files
# (grpc_messages: a SoftHSM2 token, store and audit log, on /dev/shm when
# it exists) in per-process temp directories.
rm -rf "${TMPDIR:-/tmp}"/keyseal-fuzz-config-* "${TMPDIR:-/tmp}"/keyseal-fuzz-bundle-* \
  "${TMPDIR:-/tmp}"/keyseal-fuzz-grpc-* /dev/shm/keyseal-fuzz-grpc-*
exit "$failed"
