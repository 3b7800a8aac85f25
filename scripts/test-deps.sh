#!/usr/bin/env bash
# Extra test dependencies: cargo-nextest and Python grpcio (the client nobody
# here wrote). Sourced by test.sh after deps.sh.
set -euo pipefail
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "deps: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest >&2
fi
if ! python3 -c 'import grpc, grpc_tools' 2>/dev/null; then
  echo "deps: installing grpcio and grpcio-tools with pip" >&2
  python3 -m pip install -q grpcio grpcio-tools protobuf 2>/dev/null \
    || python3 -m pip install -q --break-system-packages grpcio grpcio-tools protobuf
fi
