#!/usr/bin/env bash
# Login cost: connects per second with username/password, fleetmq against Mosquitto, in one run.
#
#   benches/auth_compare.sh            # ~2 min on 2 cores
#   USERS=200 CONNS=20000 benches/auth_compare.sh
#
# Scenarios, all with the project's load generator (`fleetmq-bench connects`, 50 at once):
#   first_login   every connection logs in as a different user, once: each login runs the
#                 broker's password hash (fleetmq: argon2id 19 MiB/2 passes for passwords people
#                 chose; Mosquitto: PBKDF2-SHA512)
#   repeat_login  CONNS connections all log in as the same users again: fleetmq answers from its
#                 verified-credential cache, Mosquitto hashes every time
#   registered_first_login (fleetmq only)  USERS devices registered through the bootstrap flow
#                 (REST newDeviceRequests/deviceCredentials) log in once each with the generated
#                 credentials (light argon2 parameters: 24 random characters need no slow hash)
# fleetmq's users are created over its REST API; Mosquitto's with mosquitto_passwd.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
USERS=${USERS:-300}
CONNS=${CONNS:-20000}
BENCH=$ROOT/target/release/fleetmq-bench
FLEETMQ=${FLEETMQ_BIN:-$ROOT/target/release/fleetmq}
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    cargo build --release -p fleetmq -p fleetmq-bench >&2
fi
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

run() { # broker label port username-template
    local label=$1 port=$2 user=$3 pid=$4
    "$BENCH" --port "$port" --label "$label" --broker-pid "$pid" --username "$user" \
        --password secret-pw --login-users "$USERS" connects --conns "$USERS" --concurrency 50 \
        | tail -1 | sed "s/^/first_login $label /"
    "$BENCH" --port "$port" --label "$label" --broker-pid "$pid" --username "$user" \
        --password secret-pw --login-users "$USERS" connects --conns "$CONNS" --concurrency 50 \
        | tail -1 | sed "s/^/repeat_login $label /"
}

# fleetmq
FPORT=$(free_port); HPORT=$(free_port)
FLEETMQ_ADMIN_PASSWORD=admin-pw FLEETMQ_BOOTSTRAP_PASSWORD=boot-pw "$FLEETMQ" --mqtt-addr "127.0.0.1:$FPORT" --http-addr "127.0.0.1:$HPORT" \
    --ws-addr "127.0.0.1:$(free_port)" --grpc-addr "127.0.0.1:$(free_port)" --data-dir "$TMP/fleetmq-data" \
    --login-ip-burst 100000 >"$TMP/fleetmq.log" 2>&1 &
FPID=$!; PIDS+=("$FPID")
wait_port "$FPORT"
curl -sf -u management/admin:admin-pw -X POST "http://127.0.0.1:$HPORT/tenant/tenants" \
    -d '{"company":"bench","domain":"bench","adminName":"admin","adminPass":"admin-pw"}' >/dev/null
for i in $(seq 0 $((USERS - 1))); do
    curl -sf -u bench/admin:admin-pw -X POST "http://127.0.0.1:$HPORT/user/bench/users" \
        -d "{\"userName\":\"u$i\",\"password\":\"secret-pw\",\"fleetmqRole\":\"user\"}" >/dev/null
done
run fleetmq "$FPORT" 'bench/u{}' "$FPID"
# Registered devices: request, first poll, accept, second poll returns the credentials.
TID=$(curl -sf -u bench/admin:admin-pw "http://127.0.0.1:$HPORT/tenant/currentTenant" | python3 -c 'import json,sys; print(json.load(sys.stdin)["name"])')
: >"$TMP/logins"
for i in $(seq 0 $((USERS - 1))); do
    curl -sf -u bench/admin:admin-pw -X POST "http://127.0.0.1:$HPORT/devicecontrol/newDeviceRequests" -d "{\"id\":\"reg$i\"}" >/dev/null
    curl -s -u management/devicebootstrap:boot-pw -X POST "http://127.0.0.1:$HPORT/devicecontrol/deviceCredentials" -d "{\"id\":\"reg$i\"}" >/dev/null
    curl -sf -u bench/admin:admin-pw -X PUT "http://127.0.0.1:$HPORT/devicecontrol/newDeviceRequests/reg$i" -d '{"status":"ACCEPTED"}' >/dev/null
    curl -sf -u management/devicebootstrap:boot-pw -X POST "http://127.0.0.1:$HPORT/devicecontrol/deviceCredentials" -d "{\"id\":\"reg$i\"}" \
        | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["tenantId"]+"/"+d["username"], d["password"])' >>"$TMP/logins"
done
"$BENCH" --port "$FPORT" --label fleetmq --broker-pid "$FPID" --logins-file "$TMP/logins" \
    --client-prefix reg connects --conns "$USERS" --concurrency 50 | tail -1 | sed "s/^/registered_first_login fleetmq /"

# Mosquitto
if command -v mosquitto >/dev/null; then
    MPORT=$(free_port)
    : >"$TMP/passwd"
    for i in $(seq 0 $((USERS - 1))); do mosquitto_passwd -b "$TMP/passwd" "u$i" secret-pw; done
    cat >"$TMP/mosquitto.conf" <<CONF
listener $MPORT 127.0.0.1
allow_anonymous false
password_file $TMP/passwd
max_keepalive 65535
set_tcp_nodelay true
# Started as root, Mosquitto would switch to user mosquitto, which cannot read the 0700 temp dir.
user root
CONF
    mosquitto -c "$TMP/mosquitto.conf" >"$TMP/mosquitto.log" 2>&1 &
    MPID=$!; PIDS+=("$MPID")
    wait_port "$MPORT"
    run mosquitto "$MPORT" 'u{}' "$MPID"
fi
