#!/usr/bin/env bash
# The local operations stack: a Prefect server (UI + API, SQLite), the process work pool
# `trieflow-local`, every deployment of prefect.yaml, and one process worker.
#
#   scripts/local_stack.sh up                    # server -> health -> pool -> deploy -> worker
#   scripts/local_stack.sh deploy                # (re)deploy prefect.yaml to the running server
#   scripts/local_stack.sh run NAME [ARGS...]    # prefect deployment run NAME --watch ARGS...
#       e.g. run data-prep/sample --params '{"config": {"out": "runs/x"}}'
#            run kgclue-pipeline/tiny --param 'config={"preset": "tiny", "out": "runs/t"}'
#   scripts/local_stack.sh status
#   scripts/local_stack.sh down                  # worker (two signals), then server
#
# Environment: PORT (4200), HOST (127.0.0.1: the API has no auth, keep it on loopback),
# PREFECT_HOME ($PWD/.prefect: SQLite DB, logs/, pids/), POOL (trieflow-local),
# HEALTH_TIMEOUT (120 s; a fresh DB takes ~15 s), DEPLOY_ARGS (instead of --all).
# Needs `prefect` on PATH (the Makefile targets put .venv/bin first), else uses .venv/bin.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PWD="$ROOT"   # prefect.yaml's pull step is `directory: "{{ $PWD }}"`, templated at deploy time

PREFECT_BIN="$(command -v prefect || true)"
[[ -n "$PREFECT_BIN" ]] || PREFECT_BIN="$ROOT/.venv/bin/prefect"
PY_BIN="$(dirname "$PREFECT_BIN")/python"
[[ -x "$PY_BIN" ]] || PY_BIN="$(command -v python3)"

HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-4200}"
POOL="${POOL:-trieflow-local}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-120}"
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
export PREFECT_API_URL="http://$HOST:$PORT/api"
export PREFECT_API_DATABASE_CONNECTION_URL="${PREFECT_API_DATABASE_CONNECTION_URL:-sqlite+aiosqlite:///$PREFECT_HOME/prefect.db}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-90}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
PIDS="$PREFECT_HOME/pids"
LOGS="$PREFECT_HOME/logs"
mkdir -p "$PIDS" "$LOGS"

log() { printf '[local_stack] %s\n' "$*" >&2; }

# pid from a pid file, only if that process is alive and is a prefect process (not a reused pid)
live_pid() {
    local f="$PIDS/$1.pid" pid
    [[ -f "$f" ]] || return 1
    pid="$(<"$f")"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q prefect || return 1
    echo "$pid"
}

healthy() { curl -fsS --max-time 2 "$PREFECT_API_URL/health" >/dev/null 2>&1; }

wait_healthy() {
    local deadline=$((SECONDS + HEALTH_TIMEOUT)) pid="${1:-}"
    until healthy; do
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "server exited during start-up; last lines of $LOGS/server.log:"; tail -n 30 "$LOGS/server.log" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "no answer from $PREFECT_API_URL/health after ${HEALTH_TIMEOUT}s"; return 1
        fi
        sleep 0.5
    done
}

# stop PID: signal SIG (repeated COUNT times, 1 s apart), wait up to WAIT s, then SIGKILL
stop_pid() {
    local pid="$1" sig="$2" count="$3" wait_s="$4" i
    for ((i = 0; i < count; i++)); do
        kill -"$sig" "$pid" 2>/dev/null || return 0
        sleep 1
    done
    for ((i = 0; i < wait_s * 4; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    log "pid $pid still alive after SIG$sig x$count + ${wait_s}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

start_server() {
    local pid
    if pid="$(live_pid server)"; then
        log "server already running (pid $pid)"
    elif healthy; then
        log "a server already answers at $PREFECT_API_URL (not started by this script); using it"
        return 0
    else
        log "starting prefect server on $HOST:$PORT (PREFECT_HOME=$PREFECT_HOME, log $LOGS/server.log)"
        nohup "$PREFECT_BIN" server start --host "$HOST" --port "$PORT" >"$LOGS/server.log" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >"$PIDS/server.pid"
    fi
    wait_healthy "$pid"
    log "server healthy: UI http://$HOST:$PORT  API $PREFECT_API_URL"
}

ensure_pool() {
    if "$PREFECT_BIN" work-pool inspect "$POOL" >/dev/null 2>&1; then
        log "work pool $POOL exists"
    else
        "$PREFECT_BIN" --no-prompt work-pool create "$POOL" --type process >/dev/null
        log "work pool $POOL created (process)"
    fi
}

# `deploy --all`, unless some entrypoint's file does not exist yet: then deploy the rest by name.
deploy() {
    healthy || { log "no server at $PREFECT_API_URL: run '$0 up' first"; return 1; }
    if [[ -n "${DEPLOY_ARGS:-}" ]]; then
        # shellcheck disable=SC2086
        "$PREFECT_BIN" --no-prompt deploy $DEPLOY_ARGS
        return
    fi
    local -a names=() missing=()
    local kind name
    while IFS=$'\t' read -r kind name; do
        if [[ "$kind" == ok ]]; then names+=(--name "$name"); else missing+=("$name"); fi
    done < <("$PY_BIN" - <<'PY'
import pathlib, yaml
doc = yaml.safe_load(pathlib.Path("prefect.yaml").read_text("utf-8"))
for d in doc.get("deployments") or []:
    path, func = d["entrypoint"].rsplit(":", 1)
    src = pathlib.Path(path)
    ok = src.is_file() and f"def {func}(" in src.read_text("utf-8")
    print(f"{'ok' if ok else 'missing'}\t{d['name'] if ok else d['name'] + ' (' + d['entrypoint'] + ')'}")
PY
)
    if ((${#missing[@]} == 0)); then
        "$PREFECT_BIN" --no-prompt deploy --all
    else
        # Deployment names are unique in prefect.yaml (tests/test_operations.py checks), so
        # `--name NAME` picks exactly one entry each.
        log "skipping deployments whose flow does not exist yet: ${missing[*]}"
        if ((${#names[@]})); then "$PREFECT_BIN" --no-prompt deploy "${names[@]}"; fi
    fi
}

start_worker() {
    local pid
    if pid="$(live_pid worker)"; then
        log "worker already running (pid $pid)"; return 0
    fi
    nohup "$PREFECT_BIN" worker start --pool "$POOL" --name "trieflow-local-$(hostname)" \
        >"$LOGS/worker.log" 2>&1 </dev/null &
    echo $! >"$PIDS/worker.pid"
    log "worker started (pid $!, pool $POOL, log $LOGS/worker.log)"
}

stop_all() {
    local pid
    # A process worker ignores the first SIGINT/SIGTERM for >30 s (it forwards it to its flow
    # runs); the second escalates. Stop it before the server it reports to.
    if pid="$(live_pid worker)"; then
        log "stopping worker (pid $pid)"; stop_pid "$pid" TERM 2 20
    fi
    rm -f "$PIDS/worker.pid"
    if pid="$(live_pid server)"; then
        log "stopping server (pid $pid)"; stop_pid "$pid" TERM 1 20
    fi
    rm -f "$PIDS/server.pid"
}

status() {
    local pid rc=0
    if pid="$(live_pid server)"; then echo "server: pid $pid"; else echo "server: not started by this script"; fi
    if healthy; then echo "api:    $PREFECT_API_URL healthy (UI http://$HOST:$PORT)"; else echo "api:    $PREFECT_API_URL down"; rc=1; fi
    if pid="$(live_pid worker)"; then echo "worker: pid $pid (pool $POOL)"; else echo "worker: not running"; rc=1; fi
    if healthy; then
        "$PREFECT_BIN" work-pool ls 2>/dev/null || true
        "$PREFECT_BIN" deployment ls 2>/dev/null || true
        "$PREFECT_BIN" flow-run ls --limit 10 2>/dev/null || true
    fi
    return "$rc"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    up)
        start_server
        ensure_pool
        deploy
        start_worker
        log "up. Try: $0 run data-prep/sample"
        ;;
    deploy) deploy ;;
    run)
        [[ $# -ge 1 ]] || { echo "usage: $0 run FLOW/DEPLOYMENT [--param k=v | --params JSON]..." >&2; exit 2; }
        name="$1"; shift
        exec "$PREFECT_BIN" deployment run "$name" --watch "$@"
        ;;
    down) stop_all ;;
    status) status ;;
    *)
        sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
