#!/usr/bin/env bash
# Installs what keyseal needs on Debian 12, only when missing. Sourced by
# run-demo.sh and test.sh. Run as root (or with sudo available).
set -euo pipefail

APT_PACKAGES=(softhsm2 swtpm swtpm-tools libtss2-dev tpm2-tools protobuf-compiler opensc pkg-config gcc libc6-dev curl ca-certificates python3 python3-pip openssl util-linux passwd)

need_apt=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
if ((${#need_apt[@]})); then
  sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  echo "deps: installing ${need_apt[*]}" >&2
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  [ -x "$HOME/.cargo/bin/cargo" ] || {
    echo "deps: installing the Rust toolchain with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt >&2
  }
  export PATH="$HOME/.cargo/bin:$PATH"
fi
