#!/usr/bin/env bash
# Creates a throwaway SoftHSM2 token for keyseal development.
#
#   softhsm/setup-token.sh DIR [LABEL]
#
# Writes DIR/softhsm2.conf (tokens under DIR/tokens), initialises a token
# labelled LABEL (default "keyseal") with a random user PIN, and writes the
# PIN to DIR/pin (mode 0600). Prints the env line to use the token.
# Refuses to touch an existing token of that label.
set -euo pipefail
dir=${1:?usage: setup-token.sh DIR [LABEL]}
label=${2:-keyseal}
here=$(cd "$(dirname "$0")" && pwd)
command -v softhsm2-util >/dev/null || { echo "softhsm2-util not found: apt-get install softhsm2" >&2; exit 69; }
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
chmod 700 "$dir" "$dir/tokens"
sed "s#@TOKENDIR@#$dir/tokens#" "$here/softhsm2.conf.template" > "$dir/softhsm2.conf"
export SOFTHSM2_CONF="$dir/softhsm2.conf"
if softhsm2-util --show-slots 2>/dev/null | grep -q "Label:.*\b$label\b"; then
  echo "token '$label' already exists in $dir/tokens; leaving it alone" >&2
else
  umask 077
  pin=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 20)
  so_pin=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 20)
  printf '%s\n' "$pin" > "$dir/pin"
  chmod 600 "$dir/pin"
  softhsm2-util --init-token --free --label "$label" --pin "$pin" --so-pin "$so_pin" >/dev/null
  echo "created SoftHSM2 token '$label' in $dir/tokens; user PIN in $dir/pin (mode 0600)" >&2
fi
echo "export SOFTHSM2_CONF=$dir/softhsm2.conf"
