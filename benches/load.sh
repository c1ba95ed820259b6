#!/usr/bin/env bash
# End-to-end load benchmark of dynamics-gateway, on one machine, loopback only.
#
# Runs the SAME wrk workloads against
#   (a) the stand-in Dataverse directly,
#   (b) the gateway in front of it (JWT check, impersonation, link rewriting),
#   (c) nginx as a plain reverse proxy in front of it (no authentication),
# and prints rps, p50, p99 and each row's ratio to (a) and, for the gateway, to nginx;
# plus the gateway's resident memory after the keep-alive run, after the 1 MiB POST run
# and while it holds 2,000 idle keep-alive connections, and its start-up-to-ready time.
#
# Workloads (each DURATION seconds, after a short warm-up per target):
#   get    GET /api/data/v9.2/WhoAmI, keep-alive, 64 connections
#   post   POST /api/data/v9.2/echo with a 1 MiB body (echoed back), 16 connections
#   close  GET /api/data/v9.2/WhoAmI with "Connection: close" (new connection per request), 64 connections
# Every request carries the same "Authorization: Bearer <caller token>": the gateway
# verifies it; the stand-in accepts any bearer; nginx passes it through.
#
# nginx: worker_processes auto (one per core, as the gateway's tokio runtime has one
# worker per core), keepalive 64 to the upstream, request and response buffering off
# (streams like the gateway), access log off (the gateway runs with RUST_LOG=warn).
#
# Usage: benches/load.sh            (about 3 minutes plus the release build)
#   DURATION=10   seconds per measured run
#   PROFILE=1     also record a perf profile of the gateway under the keep-alive workload
#   SOAK=60       also soak the gateway: SOAK seconds, 200 keep-alive connections, a mix of
#                 small GETs, 1 MiB POSTs and bad tokens; reports unexpected statuses and the
#                 resident memory after a warm-up and at the end (no growth expected)
#   NO_INSTALL=1  do not apt-get anything
#   OUT=dir       where results go (default target/load-results/<UTC time>)
# Everything listens on 127.0.0.1 only and is stopped by pid on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-2000}
OUT=${OUT:-$ROOT/target/load-results/$(date -u +%Y%m%dT%H%M%SZ)}
IDP_PORT=18081
DV_PORT=18082
NGINX_PORT=18083
GW_PORT=18080
GW_ADMIN_PORT=18090
GW_STARTUP_PORT=18180
GW_STARTUP_ADMIN_PORT=18190

log() { printf '[load] %s\n' "$*" >&2; }

# --- what the run needs -------------------------------------------------------------
need_install=()
command -v wrk >/dev/null || need_install+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_install+=(nginx)
command -v python3 >/dev/null || need_install+=(python3)
if [ "${PROFILE:-0}" = 1 ] && ! command -v perf >/dev/null; then need_install+=(linux-perf); fi
if [ ${#need_install[@]} -gt 0 ]; then
  if [ "${NO_INSTALL:-0}" = 1 ]; then
    log "missing: ${need_install[*]} (NO_INSTALL=1)"; exit 1
  fi
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  log "installing: ${need_install[*]}"
  $SUDO apt-get update -qq
  pkgs=()
  for p in "${need_install[@]}"; do
    if [ "$p" = nginx ]; then
      # nginx-light where the release still has it, else nginx.
      if apt-cache show nginx-light >/dev/null 2>&1; then pkgs+=(nginx-light); else pkgs+=(nginx); fi
    else
      pkgs+=("$p")
    fi
  done
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
# The idle-connection phase needs a few thousand descriptors per process.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log "building the release gateway and the stand-ins"
cargo build --release --quiet --bin dynamics-gateway --example standins
GATEWAY=$ROOT/target/release/dynamics-gateway
STANDINS=$ROOT/target/release/examples/standins

mkdir -p "$OUT"
TMP=$(mktemp -d)
chmod 755 "$TMP"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT

# --- helpers (Python, standard library only) -----------------------------------------
cat >"$TMP/helper.py" <<'PY'
import os, socket, subprocess, sys, time, urllib.request

def http_status(url, headers=None, data=None):
    req = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""

def launch_ready(ready_url, logfile, cmd):
    """Starts cmd, waits for ready_url to answer 200; prints 'PID MILLISECONDS'."""
    log = open(logfile, "ab")
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    deadline = start + 30
    while time.perf_counter() < deadline:
        if p.poll() is not None:
            print(f"{p.pid} -1"); return
        if http_status(ready_url)[0] == 200:
            print(f"{p.pid} {(time.perf_counter() - start) * 1000:.1f}"); return
        time.sleep(0.001)
    print(f"{p.pid} -1")

def read_response(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            return False
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    if " 200 " not in lines[0] + " ":
        return False
    hdrs = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
    if "content-length" in hdrs:
        n = int(hdrs["content-length"])
        while len(body) < n:
            chunk = s.recv(65536)
            if not chunk:
                return False
            body += chunk
        return True
    while not body.endswith(b"0\r\n\r\n"):
        chunk = s.recv(65536)
        if not chunk:
            return False
        body += chunk
    return True

def idle(port, n, token, marker, hold):
    """Opens n keep-alive connections, one WhoAmI on each, then holds them idle."""
    req = (f"GET /api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
           f"Authorization: Bearer {token}\r\n\r\n").encode()
    socks, ok = [], 0
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(req)
        ok += read_response(s)
        socks.append(s)
    open(marker, "w").write(f"{ok}\n")
    time.sleep(hold)
    still_open = 0
    for s in socks:
        s.setblocking(False)
        try:
            still_open += s.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            still_open += 1
        except OSError:
            pass
    open(marker + ".after", "w").write(f"{still_open}\n")

def check(url, token, post):
    h = {"Authorization": f"Bearer {token}"}
    status, body = http_status(url + "/api/data/v9.2/WhoAmI", h)
    if status != 200 or b"UserId" not in body:
        sys.exit(f"GET {url}: {status} {body[:200]!r}")
    payload = os.urandom(1 << 20) if post else b""
    if post:
        status, body = http_status(url + "/api/data/v9.2/echo", dict(h, **{"Content-Type": "application/octet-stream"}), payload)
        if status != 200 or body != payload:
            sys.exit(f"POST {url}: {status}, {len(body)} bytes back")

def table(results, mem, out):
    rows = [l.split() for l in open(results) if l.strip()]
    by = {(r[0], r[1]): r for r in rows}
    names = {"direct": "(a) stand-in direct", "gateway": "(b) gateway", "nginx": "(c) nginx proxy"}
    wl = {"get": "GET keep-alive", "post": "POST 1 MiB", "close": "GET new conn/request"}
    lines = ["| workload | target | conns | rps | p50 | p99 | rps / (a) | p99 / (a) | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    def rps(r): return int(r[3]) / (int(r[4]) / 1e6)
    def ms(us): return f"{float(us) / 1000:.2f} ms"
    for w in ("get", "post", "close"):
        base = by.get(("direct", w))
        for t in ("direct", "gateway", "nginx"):
            r = by.get((t, w))
            if not r:
                continue
            ratio = f"{rps(r) / rps(base):.2f}" if base else "-"
            p99r = f"{float(r[6]) / float(base[6]):.2f}" if base else "-"
            lines.append(f"| {wl[w]} | {names[t]} | {r[2]} | {rps(r):,.0f} | {ms(r[5])} | {ms(r[6])} | {ratio} | {p99r} | {int(r[7]) + int(r[8])} |")
    lines += ["", "| workload | gateway rps / nginx rps | gateway p99 / nginx p99 |", "|---|---:|---:|"]
    for w in ("get", "post", "close"):
        g, n = by.get(("gateway", w)), by.get(("nginx", w))
        if g and n:
            lines.append(f"| {wl[w]} | {rps(g) / rps(n):.2f} | {float(g[6]) / float(n[6]):.2f} |")
    lines += ["", "| memory / start-up | value |", "|---|---:|"]
    for l in open(mem):
        k, v = l.rstrip("\n").split("\t", 1)
        lines.append(f"| {k} | {v} |")
    text = "\n".join(lines) + "\n"
    open(out, "w").write(text)
    print(text)

cmd = sys.argv[1]
if cmd == "launch-ready":
    launch_ready(sys.argv[2], sys.argv[3], sys.argv[4:])
elif cmd == "idle":
    idle(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], float(sys.argv[6]))
elif cmd == "check":
    check(sys.argv[2], sys.argv[3], sys.argv[4] == "post")
elif cmd == "table":
    table(sys.argv[2], sys.argv[3], sys.argv[4])
PY
H="python3 $TMP/helper.py"

# wrk reports through done(): "target workload conns requests duration_us p50_us p99_us socket_errors non2xx"
cat >"$TMP/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local e = summary.errors
  local f = io.open(os.getenv("WRK_OUT"), "a")
  f:write(string.format("%s %s %s %d %d %d %d %d %d\n", os.getenv("WRK_TARGET"), os.getenv("WRK_WORKLOAD"),
    os.getenv("WRK_CONNS"), summary.requests, summary.duration,
    math.floor(latency:percentile(50)), math.floor(latency:percentile(99)),
    e.connect + e.read + e.write + e.timeout, e.status))
  f:close()
end
LUA
{
  echo 'wrk.method = "POST"'
  echo 'wrk.body = string.rep("x", 1048576)'
  echo 'wrk.headers["Content-Type"] = "application/octet-stream"'
  cat "$TMP/report.lua"
} >"$TMP/post.lua"

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f MiB", k / 1024}'; }
MEM=$OUT/memory.tsv
: >"$MEM"

# --- the stand-ins -----------------------------------------------------------------
log "starting the local IdP (:$IDP_PORT) and the stand-in Dataverse (:$DV_PORT)"
"$STANDINS" --idp-port $IDP_PORT --dataverse-port $DV_PORT --out "$TMP/standins" >"$OUT/standins.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 300); do [ -f "$TMP/standins/ready" ] && break; sleep 0.05; done
[ -f "$TMP/standins/ready" ] || { log "stand-ins did not start"; cat "$OUT/standins.log"; exit 1; }
# shellcheck disable=SC1091
. "$TMP/standins/standins.env"
TOKEN=$(cat "$TMP/standins/caller.token")

gateway_config() { # listen admin_listen
  cat <<YAML
server:
  listen: $1
  admin_listen: $2
  max_connections_per_peer: 0   # every wrk connection comes from 127.0.0.1
inbound:
  issuers:
    - issuer: $ISSUER
      audiences: [$AUDIENCE]
      algorithms: [RS256, PS256, ES256]
identity:
  mode: caller_object_id
dynamics:
  url: $DATAVERSE_URL
  tenant_id: $TENANT_ID
  client_id: $CLIENT_ID
  client_secret: $CLIENT_SECRET
  token_url: $TOKEN_URL
YAML
}
gateway_config "127.0.0.1:$GW_PORT" "127.0.0.1:$GW_ADMIN_PORT" >"$TMP/gateway.yaml"
gateway_config "127.0.0.1:$GW_STARTUP_PORT" "127.0.0.1:$GW_STARTUP_ADMIN_PORT" >"$TMP/gateway-startup.yaml"
cp "$TMP/gateway.yaml" "$OUT/gateway.yaml"

# --- start-up to ready: process start until /readyz says 200 (keys and S2S token loaded)
log "measuring the gateway's start-up-to-ready time (5 starts)"
startups=()
for _ in 1 2 3 4 5; do
  read -r spid sms < <(RUST_LOG=warn $H launch-ready "http://127.0.0.1:$GW_STARTUP_ADMIN_PORT/readyz" "$OUT/gateway-startup.log" \
    "$GATEWAY" --config "$TMP/gateway-startup.yaml" --log-format json run)
  kill "$spid" 2>/dev/null || true
  while kill -0 "$spid" 2>/dev/null; do sleep 0.01; done
  [ "$sms" != -1 ] || { log "gateway did not become ready"; cat "$OUT/gateway-startup.log"; exit 1; }
  startups+=("$sms")
done
sorted=$(printf '%s\n' "${startups[@]}" | sort -n | tr '\n' ' ')
printf 'start-up to ready (5 starts, ms, sorted)\t%s\n' "$sorted" >>"$MEM"

# --- the gateway and nginx ------------------------------------------------------------
log "starting the gateway (:$GW_PORT, admin :$GW_ADMIN_PORT)"
read -r GW_PID gw_ms < <(RUST_LOG=warn $H launch-ready "http://127.0.0.1:$GW_ADMIN_PORT/readyz" "$OUT/gateway.log" \
  "$GATEWAY" --config "$TMP/gateway.yaml" --log-format json run)
PIDS+=("$GW_PID")
[ "$gw_ms" != -1 ] || { log "gateway did not become ready"; cat "$OUT/gateway.log"; exit 1; }
printf 'gateway RSS when ready\t%s\n' "$(mib "$(rss_kib "$GW_PID")")" >>"$MEM"

log "starting nginx (:$NGINX_PORT)"
mkdir -p "$TMP/nginx"
USER_LINE=""; [ "$(id -u)" = 0 ] && USER_LINE="user root;"
cat >"$TMP/nginx/nginx.conf" <<NGINX
$USER_LINE
worker_processes auto;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx/body;
  proxy_temp_path $TMP/nginx/proxy;
  fastcgi_temp_path $TMP/nginx/fastcgi;
  uwsgi_temp_path $TMP/nginx/uwsgi;
  scgi_temp_path $TMP/nginx/scgi;
  upstream dataverse {
    server 127.0.0.1:$DV_PORT;
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    keepalive_requests 1000000;
    client_max_body_size 256m;
    location / {
      proxy_pass http://dataverse;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_request_buffering off;
      proxy_buffering off;
    }
  }
}
NGINX
cp "$TMP/nginx/nginx.conf" "$OUT/nginx.conf"
"$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
for _ in $(seq 1 100); do
  if $H check "http://127.0.0.1:$NGINX_PORT" "$TOKEN" get 2>/dev/null; then break; fi
  sleep 0.05
done

declare -A URL=([direct]="http://127.0.0.1:$DV_PORT" [gateway]="http://127.0.0.1:$GW_PORT" [nginx]="http://127.0.0.1:$NGINX_PORT")
for t in direct gateway nginx; do
  $H check "${URL[$t]}" "$TOKEN" post || { log "$t does not answer correctly"; exit 1; }
done
log "all three answer GET WhoAmI and echo a 1 MiB POST correctly"

RESULTS=$OUT/wrk.txt
: >"$RESULTS"
run_wrk() { # target workload conns [extra wrk args...]
  local target=$1 workload=$2 conns=$3; shift 3
  local path=/api/data/v9.2/WhoAmI script=$TMP/report.lua
  [ "$workload" = post ] && { path=/api/data/v9.2/echo; script=$TMP/post.lua; }
  WRK_OUT=$RESULTS WRK_TARGET=$target WRK_WORKLOAD=$workload WRK_CONNS=$conns \
    wrk -t2 -c"$conns" -d"${DURATION}s" --timeout 10s --latency -s "$script" \
    -H "Authorization: Bearer $TOKEN" "$@" "${URL[$target]}$path" >>"$OUT/wrk-$target-$workload.log" 2>&1
}

nginx_rss_kib() { # master + workers
  local total=0 p
  for p in $NGINX_PID $(pgrep -P "$NGINX_PID" || true); do total=$((total + $(rss_kib "$p"))); done
  echo "$total"
}

for t in direct gateway nginx; do
  log "$t: warm-up ${WARMUP}s, then get / post / close, ${DURATION}s each"
  WRK_OUT=/dev/null WRK_TARGET=$t WRK_WORKLOAD=warmup WRK_CONNS=64 \
    wrk -t2 -c64 -d"${WARMUP}s" -s "$TMP/report.lua" -H "Authorization: Bearer $TOKEN" "${URL[$t]}/api/data/v9.2/WhoAmI" >/dev/null 2>&1
  run_wrk "$t" get 64
  [ "$t" = gateway ] && printf 'gateway RSS after the keep-alive GET run\t%s\n' "$(mib "$(rss_kib "$GW_PID")")" >>"$MEM"
  [ "$t" = nginx ] && printf 'nginx RSS (master + workers) after the keep-alive GET run\t%s\n' "$(mib "$(nginx_rss_kib)")" >>"$MEM"
  run_wrk "$t" post 16
  if [ "$t" = gateway ]; then
    printf 'gateway RSS after the 1 MiB POST run\t%s\n' "$(mib "$(rss_kib "$GW_PID")")" >>"$MEM"
    printf 'gateway peak RSS (VmHWM) so far\t%s\n' "$(mib "$(hwm_kib "$GW_PID")")" >>"$MEM"
  fi
  run_wrk "$t" close 64 -H "Connection: close"
done

# --- 2,000 idle keep-alive connections held open on the gateway ----------------------
log "holding $IDLE_CONNECTIONS idle keep-alive connections on the gateway"
$H idle $GW_PORT "$IDLE_CONNECTIONS" "$TOKEN" "$TMP/idle.marker" 4 &
IDLE_PID=$!
PIDS+=("$IDLE_PID")
for _ in $(seq 1 600); do [ -f "$TMP/idle.marker" ] && break; sleep 0.05; done
sleep 1
idle_rss=$(rss_kib "$GW_PID")
wait "$IDLE_PID" || true
printf 'gateway RSS holding %s idle keep-alive connections (%s answered 200, %s still open 4 s later)\t%s\n' \
  "$IDLE_CONNECTIONS" "$(cat "$TMP/idle.marker")" "$(cat "$TMP/idle.marker.after" 2>/dev/null || echo '?')" "$(mib "$idle_rss")" >>"$MEM"

# --- optional soak ----------------------------------------------------------------------
if [ "${SOAK:-0}" -gt 0 ]; then
  cat >"$TMP/soak.lua" <<'LUA'
-- One request in 20 is a 1 MiB POST, one a bad token (401 expected), the rest small GETs.
local good = "Bearer " .. os.getenv("SOAK_TOKEN")
local big = string.rep("x", 1048576)
local threads = {}
-- Globals, not locals: done() reads each thread's counters with thread:get().
n, ok, refused, unexpected = 0, 0, 0, 0
function setup(thread) table.insert(threads, thread) end
function request()
  n = n + 1
  local k = n % 20
  if k == 0 then
    return wrk.format("POST", "/api/data/v9.2/echo", {["Authorization"] = good, ["Content-Type"] = "application/octet-stream"}, big)
  elseif k == 1 then
    return wrk.format("GET", "/api/data/v9.2/WhoAmI", {["Authorization"] = "Bearer not.a.token"})
  end
  return wrk.format("GET", "/api/data/v9.2/WhoAmI", {["Authorization"] = good})
end
function response(status)
  if status == 200 then ok = ok + 1 elseif status == 401 then refused = refused + 1 else unexpected = unexpected + 1 end
end
function done(summary)
  local t = {ok = 0, refused = 0, unexpected = 0}
  for _, th in ipairs(threads) do
    t.ok = t.ok + th:get("ok"); t.refused = t.refused + th:get("refused"); t.unexpected = t.unexpected + th:get("unexpected")
  end
  local e = summary.errors
  local f = io.open(os.getenv("WRK_OUT"), "a")
  f:write(string.format("%d %d %d %d %d\n", t.ok, t.refused, t.unexpected, e.connect + e.read + e.write + e.timeout, summary.requests))
  f:close()
end
LUA
  soak_run() { # seconds out
    WRK_OUT=$2 SOAK_TOKEN=$TOKEN wrk -t2 -c200 -d"$1s" --timeout 10s -s "$TMP/soak.lua" "${URL[gateway]}" >>"$OUT/wrk-soak.log" 2>&1
  }
  log "soak: 10 s warm-up, then ${SOAK} s at 200 connections (GET / 1 MiB POST / bad token)"
  soak_run 10 /dev/null
  warm_rss=$(rss_kib "$GW_PID")
  soak_run "$SOAK" "$OUT/soak.txt"
  end_rss=$(rss_kib "$GW_PID")
  read -r s_ok s_refused s_unexpected s_socket s_total <"$OUT/soak.txt"
  printf 'soak %s s, 200 conns: requests / 200 / 401 (bad token) / unexpected status / socket errors\t%s / %s / %s / %s / %s\n' \
    "$SOAK" "$s_total" "$s_ok" "$s_refused" "$s_unexpected" "$s_socket" >>"$MEM"
  printf 'soak: gateway RSS after warm-up -> at the end\t%s -> %s\n' "$(mib "$warm_rss")" "$(mib "$end_rss")" >>"$MEM"
fi

# --- optional profile ------------------------------------------------------------------
if [ "${PROFILE:-0}" = 1 ]; then
  log "profiling the gateway under the keep-alive GET workload (perf, cpu-clock, ${DURATION}s)"
  perf record -e cpu-clock -F 999 -p "$GW_PID" -o "$OUT/perf.data" -- sleep "$DURATION" >/dev/null 2>&1 &
  PERF_PID=$!
  WRK_OUT=/dev/null WRK_TARGET=profile WRK_WORKLOAD=get WRK_CONNS=64 \
    wrk -t2 -c64 -d"${DURATION}s" -s "$TMP/report.lua" -H "Authorization: Bearer $TOKEN" "${URL[gateway]}/api/data/v9.2/WhoAmI" >/dev/null 2>&1
  wait "$PERF_PID" || true
  perf report -i "$OUT/perf.data" --no-children --sort dso --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' \
    | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' | head -15 >"$OUT/perf-dso.txt" || true
  perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' \
    | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' | head -60 >"$OUT/perf-symbols.txt" || true
  log "profile: $OUT/perf-dso.txt, $OUT/perf-symbols.txt"
fi

{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "versions: $("$GATEWAY" --version), $("$NGINX" -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $(rustc --version | cut -d' ' -f1-2), kernel $(uname -r)"
  echo "runs: ${DURATION}s each after a ${WARMUP}s warm-up per target; wrk -t2; nginx worker_processes auto ($(nproc))"
  echo
} >"$OUT/table.md"
$H table "$RESULTS" "$MEM" "$OUT/table.tmp"
cat "$OUT/table.tmp" >>"$OUT/table.md"
rm -f "$OUT/table.tmp"
head -5 "$OUT/table.md"
log "results: $OUT"
