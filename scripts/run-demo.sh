#!/usr/bin/env bash
# The main job, on a fresh Debian 12 machine as root:
#   ./scripts/run-demo.sh
# Installs what is missing, builds keyseal, creates a throwaway SoftHSM2
# token and a development config under ./demo, initialises the root key,
# starts keyseald in the background, then shows the keyseal CLI storing and
# reading a secret, `keyseal run` handing it to a child process, and a root
# key rotation. keyseald keeps running afterwards; the script prints how to
# stop it. Run it again to restart the demo daemon on the same store.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

echo "== building keyseal (release)"
cargo build --release --locked --bins
bin=$PWD/target/release
demo=$PWD/demo
mkdir -p "$demo"
chmod 700 "$demo"

# Stop a daemon left over from an earlier run of this demo.
if [ -f "$demo/keyseald.pid" ] && kill -0 "$(cat "$demo/keyseald.pid")" 2>/dev/null; then
  echo "== stopping the previous demo daemon"
  kill -TERM "$(cat "$demo/keyseald.pid")"
  for _ in $(seq 50); do kill -0 "$(cat "$demo/keyseald.pid")" 2>/dev/null || break; sleep 0.1; done
fi

echo "== SoftHSM2 token"
eval "$(softhsm/setup-token.sh "$demo/softhsm" keyseal-demo)"

uid=$(id -u)
cat > "$demo/keyseald.toml" <<TOML
# Development config written by scripts/run-demo.sh.
[root]
backend = "pkcs11"
[root.pkcs11]
module = "$(ls /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so 2>/dev/null | head -1)"
token_label = "keyseal-demo"
pin_file = "softhsm/pin"

[store]
path = "store"

[api]
socket = "keyseal.sock"
mode = "0600"
credentials_socket = "credentials.sock"

[policy]
path = "policy.toml"

[log]
format = "human"
TOML
cat > "$demo/policy.toml" <<TOML
# Development policy written by scripts/run-demo.sh: the user who ran the
# demo (uid $uid) may do everything. Default deny for everyone else.
[[rule]]
name = "demo operator: secrets"
capabilities = ["secret:read", "secret:write", "secret:delete", "secret:destroy"]
names = ["**"]
[rule.match]
uid = $uid

[[rule]]
name = "demo operator: admin"
capabilities = ["system:admin", "audit:read"]
[rule.match]
uid = $uid
TOML
chmod 600 "$demo/keyseald.toml" "$demo/policy.toml"

echo "== keyseal init (creates root key v1 on the token, once)"
"$bin/keyseal" init --config "$demo/keyseald.toml"

echo "== starting keyseald"
export SOFTHSM2_CONF
nohup "$bin/keyseald" --config "$demo/keyseald.toml" > "$demo/keyseald.log" 2>&1 &
echo $! > "$demo/keyseald.pid"
export KEYSEAL_SOCKET=$demo/keyseal.sock
pid=$(cat "$demo/keyseald.pid")
for _ in $(seq 100); do
  kill -0 "$pid" 2>/dev/null || { echo "keyseald exited; its log:" >&2; cat "$demo/keyseald.log" >&2; exit 1; }
  [ -S "$KEYSEAL_SOCKET" ] && "$bin/keyseal" status >/dev/null 2>&1 && break
  sleep 0.1
done
"$bin/keyseal" status

echo
echo "== keyseal secret put demo/db/password (value from stdin, never argv)"
head -c 24 /dev/urandom | base64 | tr -d '\n' | "$bin/keyseal" secret put demo/db/password
echo "== keyseal secret get demo/db/password"
"$bin/keyseal" secret get demo/db/password; echo
echo "== keyseal secret ls demo/"
"$bin/keyseal" secret ls demo/
echo "== keyseal run --env DB_PASSWORD=demo/db/password -- sh -c '...'"
"$bin/keyseal" run --env DB_PASSWORD=demo/db/password -- sh -c 'echo "child sees DB_PASSWORD with ${#DB_PASSWORD} characters"'
echo "== keyseal root rotate"
"$bin/keyseal" root rotate
echo "== read back after rotation"
"$bin/keyseal" secret get demo/db/password; echo
"$bin/keyseal" secret history demo/db/password

cat <<MSG

keyseald is running (pid $(cat "$demo/keyseald.pid")), log in $demo/keyseald.log.
Try:   export KEYSEAL_SOCKET=$demo/keyseal.sock; $bin/keyseal secret ls
Stop:  kill \$(cat $demo/keyseald.pid)
MSG
