#!/usr/bin/env bash
# Compare fleetmq against Mosquitto with the project's own load generator.
#
#   benches/compare.sh                 # full run (~3-4 min on 2 cores)
#   QUICK=1 benches/compare.sh         # ~10x smaller, for smoke tests
#
# Knobs (environment):
#   QUICK=1            shrink every scenario
#   FLEETMQ_BIN=path   use this broker binary instead of building target/release/fleetmq
#   FLEETMQ_ARGS="..." extra broker flags; default lifts the per-session queue/inflight
#                      caps like the Mosquitto config below (fleetmq defaults: 10000/1024)
#   NO_FLEETMQ=1       Mosquitto only
#   NO_MOSQUITTO=1     fleetmq only
#   SKIP_BUILD=1       do not run cargo (binaries must exist)
#   BENCH_THREADS=N    tokio worker threads of the generator (default 1: leaves a core to the broker)
#   ONLY="fanin_q0 idle"  run only these scenario names
#   CLUSTER=1          afterwards, the cluster scenarios of benches/cluster.sh (3 nodes)
#   RESULTS=path       where to write the raw JSON lines
#                      (default target/bench-results/<timestamp>.jsonl)
#
# Output: a table  scenario | metric | fleetmq | mosquitto | ratio (fleetmq/mosquitto)
# on stdout; generator summaries and broker problems on stderr.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

QUICK=${QUICK:-0}
BENCH_THREADS=${BENCH_THREADS:-1}
ONLY=${ONLY:-}
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS=${RESULTS:-$ROOT/target/bench-results/$STAMP.jsonl}
mkdir -p "$(dirname "$RESULTS")"
: >"$RESULTS"

log() { echo "[compare] $*" >&2; }

# --- build -------------------------------------------------------------------
BENCH=$ROOT/target/release/fleetmq-bench
FLEETMQ=${FLEETMQ_BIN:-$ROOT/target/release/fleetmq}
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    if [[ -n "${FLEETMQ_BIN:-}" || "${NO_FLEETMQ:-0}" == 1 ]]; then
        cargo build --release -p fleetmq-bench >&2
    elif ! cargo build --release -p fleetmq -p fleetmq-bench >&2; then
        log "building fleetmq failed; continuing with Mosquitto only"
        NO_FLEETMQ=1
        cargo build --release -p fleetmq-bench >&2
    fi
fi
[[ -x "$BENCH" ]] || { log "missing $BENCH"; exit 1; }

# Brokers and generator need many descriptors for the idle scenario.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open files limit: $(ulimit -n)"

# --- brokers -----------------------------------------------------------------
TMP=$(mktemp -d /tmp/fleetmq-compare.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        # give them a moment, then force
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$p" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_port PID PORT SECS: true once PORT accepts connections, false if PID died or timeout
wait_port() {
    local pid=$1 port=$2 secs=$3 i
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

FLEETMQ_ARGS=${FLEETMQ_ARGS---max-queued-messages 100000000 --max-inflight 65535}
declare -A PORT PID
BROKERS=()

if [[ "${NO_FLEETMQ:-0}" != 1 ]]; then
    if [[ -x "$FLEETMQ" ]]; then
        PORT[fleetmq]=$(free_port)
        HTTP_PORT=$(free_port)
        mkdir -p "$TMP/fleetmq-data"
        # shellcheck disable=SC2086
        "$FLEETMQ" --mqtt-addr "127.0.0.1:${PORT[fleetmq]}" --http-addr "127.0.0.1:$HTTP_PORT" \
            --data-dir "$TMP/fleetmq-data" --anonymous-tenant bench --ws-addr "127.0.0.1:$(free_port)" --grpc-addr "127.0.0.1:$(free_port)" $FLEETMQ_ARGS >"$TMP/fleetmq.log" 2>&1 &
        PID[fleetmq]=$!
        PIDS+=("${PID[fleetmq]}")
        if wait_port "${PID[fleetmq]}" "${PORT[fleetmq]}" 20; then
            BROKERS+=(fleetmq)
            log "fleetmq pid ${PID[fleetmq]} on port ${PORT[fleetmq]}"
        else
            log "fleetmq did not start listening on ${PORT[fleetmq]}; skipping it. Log tail:"
            tail -n 20 "$TMP/fleetmq.log" >&2 || true
        fi
    else
        log "no fleetmq binary at $FLEETMQ; skipping it"
    fi
fi

if [[ "${NO_MOSQUITTO:-0}" != 1 ]]; then
    if command -v mosquitto >/dev/null; then
        PORT[mosquitto]=$(free_port)
        # Fair settings: no per-client queue/inflight caps (the generator would
        # otherwise see Mosquitto's defaults of 1000 queued / 20 inflight as loss),
        # TCP_NODELAY like any low-latency broker, no disk persistence.
        cat >"$TMP/mosquitto.conf" <<EOF
listener ${PORT[mosquitto]} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000000
max_queued_bytes 0
max_inflight_messages 0
max_inflight_bytes 0
max_keepalive 65535
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
EOF
        mosquitto -c "$TMP/mosquitto.conf" >"$TMP/mosquitto.log" 2>&1 &
        PID[mosquitto]=$!
        PIDS+=("${PID[mosquitto]}")
        if wait_port "${PID[mosquitto]}" "${PORT[mosquitto]}" 10; then
            BROKERS+=(mosquitto)
            log "mosquitto $(mosquitto -h 2>/dev/null | head -n1 | awk '{print $3}') pid ${PID[mosquitto]} on port ${PORT[mosquitto]}"
        else
            log "mosquitto failed to start:"
            cat "$TMP/mosquitto.log" >&2 || true
        fi
    else
        log "mosquitto not installed; skipping it"
    fi
fi

((${#BROKERS[@]} > 0)) || { log "no broker to benchmark"; exit 1; }

# --- scenarios ---------------------------------------------------------------
if [[ "$QUICK" == 1 ]]; then
    S=10; LAT_SECS=3; IDLE_CONNS=1000; CONNS=1000; TIMEOUT=30
else
    S=1; LAT_SECS=10; IDLE_CONNS=5000; CONNS=5000; TIMEOUT=120
fi

# Scenario table: name|only_fleetmq|generator args. Idle runs first so the RSS
# delta is measured on fresh brokers (a heap grown by earlier queues hides it).
SCENARIOS=(
    "idle|0|idle --conns $IDLE_CONNS --hold-secs 3 --concurrency 200"
    "connects|0|connects --conns $CONNS --concurrency 50"
    "fanin_q0|0|fanin --pubs 10 --qos 0 --msgs $((2000000 / S)) --size 64"
    "fanin_q1|0|fanin --pubs 10 --qos 1 --msgs $((1000000 / S)) --size 64 --window 128"
    "fanin_q2|0|fanin --pubs 10 --qos 2 --msgs $((100000 / S)) --size 64 --window 128"
    "fanout_q1|0|fanout --subs 20 --qos 1 --msgs $((20000 / S)) --size 64 --window 128"
    "latency_q0|0|latency --rate 20000 --secs $LAT_SECS --qos 0 --size 64"
    "latency_q1|0|latency --rate 20000 --secs $LAT_SECS --qos 1 --size 64"
    "persistent_q1|1|--clean false fanin --pubs 10 --qos 1 --msgs $((1000000 / S)) --size 64 --window 128"
    "ingest_plain_q1|0|ingest --devices 10 --msgs $((300000 / S)) --window 32 --plain"
    "ingest_smartrest_q1|1|ingest --devices 10 --msgs $((100000 / S)) --window 32"
)

for entry in "${SCENARIOS[@]}"; do
    IFS='|' read -r name only_fleetmq args <<<"$entry"
    if [[ -n "$ONLY" && " $ONLY " != *" $name "* ]]; then continue; fi
    for b in "${BROKERS[@]}"; do
        if [[ "$only_fleetmq" == 1 && "$b" != fleetmq ]]; then
            # Still run it on Mosquitto when fleetmq is absent, to validate the scenario.
            [[ " ${BROKERS[*]} " == *" fleetmq "* ]] && continue
        fi
        if ! kill -0 "${PID[$b]}" 2>/dev/null; then
            log "$b is no longer running; skipping $name"
            continue
        fi
        log "$name on $b: fleetmq-bench $args"
        # shellcheck disable=SC2086
        line=$("$BENCH" --port "${PORT[$b]}" --broker-pid "${PID[$b]}" --threads "$BENCH_THREADS" \
            --timeout-secs "$TIMEOUT" --client-prefix "cmp-$b" --label "$b" $args) || true
        if [[ "$line" != \{* ]]; then
            line="{\"scenario\":\"$name\",\"error\":\"generator produced no JSON\",\"label\":\"$b\"}"
        fi
        printf '{"run":"%s","broker":"%s","ts":"%s",%s\n' "$name" "$b" "$STAMP" "${line#\{}" >>"$RESULTS"
        sleep 1 # let the broker drain/free before the next run
    done
done

for b in "${BROKERS[@]}"; do
    kill -0 "${PID[$b]}" 2>/dev/null || { log "WARNING: $b exited during the run; log tail:"; tail -n 20 "$TMP/$b.log" >&2 || true; }
done

# --- table -------------------------------------------------------------------
python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
metrics = {
    "idle": [("rss_per_conn_bytes", "B/conn, lower=better"), ("opened", "")],
    "connects": [("connects_per_sec", ""), ("p99_us", "connect p99"), ("broker_cpu_sec", "")],
    "latency": [("msgs_per_sec", ""), ("p50_us", ""), ("p99_us", ""), ("p999_us", ""), ("max_us", ""), ("lost", ""), ("broker_cpu_sec", "")],
    "ingest_plain": [("msgs_per_sec", ""), ("ack_p50_us", "publish to PUBACK"), ("ack_p99_us", ""), ("msgs_per_broker_cpu_sec", ""), ("broker_cpu_sec", "")],
    "ingest_smartrest": [("msgs_per_sec", ""), ("ack_p50_us", "publish to PUBACK, committed"), ("ack_p99_us", ""), ("msgs_per_broker_cpu_sec", ""), ("broker_cpu_sec", "")],
    "*": [("msgs_per_sec", ""), ("msgs_per_cpu_sec", ""), ("p50_us", ""), ("p99_us", ""), ("lost", ""), ("duplicates", ""), ("broker_cpu_sec", "")],
}
runs, data = [], {}
for r in rows:
    if r["run"] not in runs:
        runs.append(r["run"])
    data[(r["run"], r["broker"])] = r
def fmt(v):
    if v is None: return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}"
    return str(v)
out = [("scenario", "metric", "fleetmq", "mosquitto", "ratio")]
for run in runs:
    f, m = data.get((run, "fleetmq"), {}), data.get((run, "mosquitto"), {})
    kind = (f or m).get("scenario", run)
    for key, note in metrics.get(kind, metrics["*"]):
        a, b = f.get(key), m.get(key)
        ratio = "-"
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            ratio = f"{a / b:.2f}"
        out.append((run, key + (f" ({note})" if note else ""), fmt(a), fmt(b), ratio))
    for who, d in (("fleetmq", f), ("mosquitto", m)):
        if d.get("error") or d.get("errors"):
            out.append((run, f"ERROR {who}", str(d.get("error") or d.get("errors"))[:80], "", ""))
w = [max(len(r[i]) for r in out) for i in range(5)]
for i, r in enumerate(out):
    print(" | ".join(c.ljust(w[j]) if j < 2 else c.rjust(w[j]) for j, c in enumerate(r)))
    if i == 0:
        print("-+-".join("-" * x for x in w))
PY
log "raw results: $RESULTS"

# --- cluster scenarios (Mosquitto has no cluster to compare with) ---------------
# CLUSTER=1 also runs benches/cluster.sh: cross-node latency against same-node, durable
# throughput with 1 and 3 replicas, takeover latency, resume after kill -9.
if [[ "${CLUSTER:-0}" == 1 ]]; then
    log "cluster scenarios (benches/cluster.sh)"
    SKIP_BUILD=1 QUICK="$QUICK" "$ROOT/benches/cluster.sh"
fi
