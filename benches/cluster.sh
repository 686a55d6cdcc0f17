#!/usr/bin/env bash
# Cluster scenarios: a 3-node fleetmq cluster on loopback against one node alone, with the
# project's load generator and mosquitto clients.
#
#   benches/cluster.sh            # ~2 min on 2 cores after the release build
#   QUICK=1 benches/cluster.sh    # smaller
#   SHARDS=0 benches/cluster.sh   # the clusters it creates have no shards (one Raft group)
#
# Prints one line per figure:
#   latency_q1 same-node / cross-node p50 p99 (µs): publisher and subscriber on one node, then
#     on two nodes (the message is forwarded over gRPC);
#   persistent_q1 single / cluster msgs/s: durable QoS 1 fan-in into a persistent session, on a
#     one-node cluster (1 replica) and on the 3-node cluster (3 replicas): one session, so one
#     shard takes every write;
#   persistent_fanout_q1 single / cluster deliveries/s: one publisher, 10 persistent subscribers
#     (their sessions spread over the shards), QoS 1: every publish is split over the shards;
#   takeover ms p50 p99: CONNECT on node 2 of a client id connected on node 1, until CONNACK;
#   resume ms: kill -9 of the node holding a persistent session (the Raft leader), until the
#     client has its session back (CONNACK + SUBACK) on another node.
# Needs: mosquitto_sub / mosquitto_pub (apt install mosquitto-clients), python3.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
QUICK=${QUICK:-0}
if [[ "$QUICK" == 1 ]]; then S=10; LAT_SECS=3; ROUNDS=5; else S=1; LAT_SECS=10; ROUNDS=20; fi

log() { echo "[cluster] $*" >&2; }
[[ "${SKIP_BUILD:-0}" == 1 ]] || cargo build --release -p fleetmq -p fleetmq-bench >&2
FLEETMQ=$ROOT/target/release/fleetmq
BENCH=$ROOT/target/release/fleetmq-bench
command -v mosquitto_sub >/dev/null || { log "mosquitto_sub missing"; exit 1; }

TMP=$(mktemp -d /tmp/fleetmq-cluster.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    [[ "${KEEP:-0}" == 1 ]] && echo "kept $TMP" >&2 || rm -rf "$TMP"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
now_ms() { date +%s%3N; }

declare -A MQTT GRPC PID
ARGS=(--anonymous-tenant bench --max-queued-messages 100000000 --max-inflight 65535 --shards "${SHARDS:-4}")
# As a production cluster runs: node-to-node calls carry the secret (and pay for its check).
export FLEETMQ_CLUSTER_SECRET=${FLEETMQ_CLUSTER_SECRET:-bench-cluster-secret}

# start NAME ID [JOIN]: starts a node and waits for its --print-addrs line
start() {
    local name=$1 id=$2 join=${3:-}
    MQTT[$name]=${MQTT[$name]:-$(free_port)}
    GRPC[$name]=${GRPC[$name]:-$(free_port)}
    mkdir -p "$TMP/$name"
    local extra=()
    [[ -n "$join" ]] && extra=(--join "$join")
    "$FLEETMQ" --node-id "$id" --mqtt-addr "127.0.0.1:${MQTT[$name]}" --http-addr "127.0.0.1:$(free_port)" \
        --grpc-addr "127.0.0.1:${GRPC[$name]}" --ws-addr "127.0.0.1:$(free_port)" \
        --data-dir "$TMP/$name" --print-addrs "${ARGS[@]}" "${extra[@]}" \
        >"$TMP/$name.out" 2>"$TMP/$name.log" &
    PID[$name]=$!
    PIDS+=("${PID[$name]}")
    for _ in $(seq 1 600); do
        grep -q mqtt "$TMP/$name.out" 2>/dev/null && return 0
        kill -0 "${PID[$name]}" 2>/dev/null || break
        sleep 0.1
    done
    log "$name did not start; log tail:"; tail -n 20 "$TMP/$name.log" >&2; exit 1
}

field() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(d.get(sys.argv[2], 'n/a'))" "$1" "$2"; }

bench() { "$BENCH" --threads 1 --timeout-secs 120 --client-prefix "cl$RANDOM" "$@"; }

# --- one node: durable throughput with 1 replica ------------------------------------------------
start solo 1
line=$(bench --port "${MQTT[solo]}" --clean false fanin --pubs 10 --qos 1 --msgs $((300000 / S)) --size 64 --window 128)
SOLO_RATE=$(field "$line" msgs_per_sec)
line=$(bench --port "${MQTT[solo]}" --clean false fanout --subs 10 --qos 1 --msgs $((30000 / S)) --size 64 --window 128)
SOLO_FANOUT="$(field "$line" msgs_per_sec) lost $(field "$line" lost)"
# Device ingestion: 10 devices send SmartREST 200 measurements on s/us at QoS 1 (each PUBACK
# after the measurement is committed in the device's shard); --plain: the same payloads to a
# free-form topic nobody subscribes to (acknowledged without a durable write).
ingest() {
    local port=$1 what=$2; shift 2
    local line
    line=$(bench --port "$port" ingest --devices 10 --msgs $((100000 / S)) --window 32 "$@")
    echo "$what msgs_per_sec $(field "$line" msgs_per_sec) ack_p50_us $(field "$line" ack_p50_us) ack_p99_us $(field "$line" ack_p99_us) acked $(field "$line" acked) errors $(field "$line" errors)"
}
ingest "${MQTT[solo]}" "ingest_smartrest_200_q1 1-node"
ingest "${MQTT[solo]}" "ingest_plain_q1 1-node" --plain
kill "${PID[solo]}"; wait "${PID[solo]}" 2>/dev/null || true

# --- three nodes ------------------------------------------------------------------------------
start n1 1
start n2 2 "127.0.0.1:${GRPC[n1]}"
start n3 3 "127.0.0.1:${GRPC[n1]}"
sleep 1

line=$(bench --port "${MQTT[n1]}" latency --rate 2000 --secs "$LAT_SECS" --qos 1 --size 64)
echo "latency_q1 same-node  p50_us $(field "$line" p50_us) p99_us $(field "$line" p99_us)"
line=$(bench --port "${MQTT[n1]}" --sub-port "${MQTT[n2]}" latency --rate 2000 --secs "$LAT_SECS" --qos 1 --size 64)
echo "latency_q1 cross-node p50_us $(field "$line" p50_us) p99_us $(field "$line" p99_us)"

line=$(bench --port "${MQTT[n1]}" --clean false fanin --pubs 10 --qos 1 --msgs $((300000 / S)) --size 64 --window 128)
echo "persistent_q1 1-replica msgs_per_sec $SOLO_RATE 3-replicas msgs_per_sec $(field "$line" msgs_per_sec)"
line=$(bench --port "${MQTT[n1]}" --clean false fanout --subs 10 --qos 1 --msgs $((30000 / S)) --size 64 --window 128)
echo "persistent_fanout_q1 (shards ${SHARDS:-4}) 1-replica deliveries_per_sec $SOLO_FANOUT 3-replicas deliveries_per_sec $(field "$line" msgs_per_sec) lost $(field "$line" lost)"

ingest "${MQTT[n1]}" "ingest_smartrest_200_q1 3-nodes"
ingest "${MQTT[n1]}" "ingest_plain_q1 3-nodes" --plain

# Takeover: hold the id on n1, connect it on n2, time to CONNACK (the subscribe proves it).
T=()
for i in $(seq 1 "$ROUNDS"); do
    mosquitto_sub -h 127.0.0.1 -p "${MQTT[n1]}" -i takeover-$i -t t/x -q 1 >/dev/null 2>&1 &
    holder=$!
    sleep 0.3
    t0=$(now_ms)
    mosquitto_sub -h 127.0.0.1 -p "${MQTT[n2]}" -i takeover-$i -t t/x -q 1 -E >/dev/null 2>&1 || true
    T+=($(($(now_ms) - t0)))
    kill "$holder" 2>/dev/null || true
done
python3 - "${T[@]}" <<'EOF'
import sys
v = sorted(int(x) for x in sys.argv[1:])
pct = lambda p: v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
print(f"takeover_ms (incl. client start) p50 {pct(50)} p99 {pct(99)} n {len(v)}")
EOF

# Resume after kill -9: a persistent session held by n1 (the Raft leader: it formed the
# cluster), n1 killed, back on n2 once n2/n3 have elected a new leader.
mosquitto_sub -h 127.0.0.1 -p "${MQTT[n1]}" -i resume-1 -c -q 1 -t r/x -E >/dev/null 2>&1
mosquitto_sub -h 127.0.0.1 -p "${MQTT[n1]}" -i resume-1 -c -q 1 -t r/x >/dev/null 2>&1 &
sleep 0.5
t0=$(now_ms)
kill -9 "${PID[n1]}"
until mosquitto_sub -h 127.0.0.1 -p "${MQTT[n2]}" -i resume-1 -c -q 1 -t r/x -E >/dev/null 2>&1; do
    (($(now_ms) - t0 > 30000)) && { echo "resume_ms timeout"; break; }
    sleep 0.02
done
echo "resume_ms (kill -9 of the leader holding the session, until it is back on another node) $(($(now_ms) - t0))"
