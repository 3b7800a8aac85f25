#!/usr/bin/env bash
# Extra test dependencies: cargo-nextest, cargo-deny (supply chain),
# cargo-fuzz (fuzz targets) and Python grpcio (the client nobody here
# wrote). Sourced by test.sh after deps.sh.
set -euo pipefail
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "deps: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest >&2
fi
if ! cargo deny --version >/dev/null 2>&1; then
  echo "deps: installing cargo-deny" >&2
  cargo install --locked cargo-deny >&2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "deps: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz >&2
fi
if ! python3 -c 'import grpc, grpc_tools, jwt, cryptography' 2>/dev/null; then
  echo "deps: installing grpcio, grpcio-tools and PyJWT (independent JWT verifier) with pip" >&2
  python3 -m pip install -q grpcio grpcio-tools protobuf pyjwt cryptography 2>/dev/null \
    || python3 -m pip install -q --break-system-packages grpcio grpcio-tools protobuf pyjwt cryptography
fi
