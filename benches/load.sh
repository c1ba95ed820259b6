#!/usr/bin/env bash
# The load benchmark of issue 14, on one machine, loopback only: ONE run produces the table
# of dynamics-gateway against the proxies it competes with, all in front of the same
# cheapest upstream, all verifying (or, for nginx, passing) the SAME RS256 caller token.
#
# Targets (each on its own 127.0.0.1 port):
#   direct       the upstream itself: ONE nginx worker (worker_processes 1) answering
#                GET .../accounts with {"value":[]} (return 200, application/json),
#                GET .../contacts with a static 1 MiB JSON file, GET .../$metadata with the
#                stand-in's CSDL (for the gateway's access rules), and proxying
#                POST .../echo to the stand-in Dataverse's /echo (nginx cannot echo a body;
#                its `return` answers before reading the body, which would measure nothing
#                of the upload). So the POST row's upstream is "nginx -> stand-in echo" for
#                every target alike, and its 1 MiB comes back.
#   nginx        nginx plain reverse proxy, no auth, access log off, keepalive 64 upstream,
#                worker_processes auto (one per core), request/response buffering off
#   haproxy      HAProxy (Debian's 2.6) verifying the bearer on every request:
#                jwt_verify(RS256, PEM public key) plus alg, iss, aud and exp checks; 401 else
#   apache       Apache 2.4 + mod_auth_openidc as OAuth 2.0 resource server (AuthType oauth20,
#                the JWT verified locally with the IdP's key: OIDCOAuthVerifyCertFiles with the PEM from its JWKS, as OIDCOAuthVerifyJwksUri takes https only),
#                mpm_event, mod_proxy_http with keep-alive to the upstream
#   gateway      the release gateway, Dataverse URL = the upstream nginx, S2S token from the
#                stand-in IdP, RUST_LOG at info (one audit line per request, written to a file),
#                access rules (default deny, the token's scope granted GET/POST on the tables
#                used; $metadata fetched from the upstream), the budget gate (local, no store),
#                max_connections_per_peer: 0 (wrk's connections all come from 127.0.0.1)
#   gateway-wt1, gateway-wt2   the same with server.worker_threads 1 and 2 (keep-alive GET only)
#   gateway-h2   the same with dynamics.upstream_http: http2, to the upstream nginx's second
#                port (HTTP/2 by prior knowledge, the same locations): one multiplexed
#                connection per request thread instead of a pool of HTTP/1.1 connections
# The caller token is minted by the stand-in IdP (examples/standins.rs); HAProxy gets its
# signing key as PEM and Apache the JWKS URI, both from the IdP's JWKS. Before measuring,
# each verifying peer must answer 200 to the good token and 401/403 to a tampered signature
# and to no token, or the script stops.
#
# Workloads (each DURATION seconds, wrk -t2, after a WARMUP per target):
#   get     GET .../accounts keep-alive, 64 connections (256 and 1,024 too for nginx and the gateway)
#   close   the same with "Connection: close" (a new connection per request), 64 connections
#   post    POST .../echo, a 1 MiB JSON body (echoed back), 16 connections
#   big     GET .../contacts, a 1 MiB JSON answer, 16 connections
# Rounds are interleaved (round 1 of every target, then round 2, ...) so drifting noise from
# a shared machine spreads over all targets; medians over ROUNDS are reported.
# Per row: req/s, p99, the ratio to nginx, CPU per request (utime+stime from /proc of the
# target's process and all its children, over the run, divided by the requests) and RSS
# after the run. For the gateway also: RSS holding 2,000 idle keep-alive connections (on a
# fresh process, so the 1 MiB runs' allocator leftovers do not count) and
# start-up-to-ready time. The table ends with the targets of issue 14, met or missed.
#
# Usage: benches/load.sh            (about 15 minutes at the defaults, plus the release build)
#   DURATION=10   seconds per measured run
#   ROUNDS=3      rounds per workload and target (medians)
#   TARGETS="direct nginx haproxy apache gateway gateway-wt1 gateway-wt2 gateway-h2"   which to run
#   IDP_PORT=18081 ... GW_STARTUP_ADMIN_PORT=18190   every port below can be moved (another lab on 180xx)
#   PROFILE=1     also record a perf profile of the gateway under each workload (get, close, post, big)
#   SOAK=60       also soak the gateway: SOAK seconds, 200 keep-alive connections, a mix of
#                 small GETs, 1 MiB POSTs and bad tokens; reports unexpected statuses and the
#                 resident memory after a warm-up and at the end (no growth expected)
#   NO_INSTALL=1  do not apt-get anything (wrk nginx-light haproxy apache2
#                 libapache2-mod-auth-openidc are installed otherwise, services not started)
#   OUT=dir       where results go (default target/load-results/<UTC time>); table.md is the table
# Everything listens on 127.0.0.1 only and is stopped by pid on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-2000}
TARGETS=${TARGETS:-direct nginx haproxy apache gateway gateway-wt1 gateway-wt2 gateway-h2}
OUT=${OUT:-$ROOT/target/load-results/$(date -u +%Y%m%dT%H%M%SZ)}
IDP_PORT=${IDP_PORT:-18081}
DV_PORT=${DV_PORT:-18082}
NGINX_PORT=${NGINX_PORT:-18083}
UP_PORT=${UP_PORT:-18084}
UP2_PORT=${UP2_PORT:-18089}
HAPROXY_PORT=${HAPROXY_PORT:-18085}
APACHE_PORT=${APACHE_PORT:-18086}
GW_PORT=${GW_PORT:-18080}
GW_ADMIN_PORT=${GW_ADMIN_PORT:-18090}
GW1_PORT=${GW1_PORT:-18087}
GW1_ADMIN_PORT=${GW1_ADMIN_PORT:-18091}
GW2_PORT=${GW2_PORT:-18088}
GW2_ADMIN_PORT=${GW2_ADMIN_PORT:-18092}
GWH2_PORT=${GWH2_PORT:-18093}
GWH2_ADMIN_PORT=${GWH2_ADMIN_PORT:-18094}
GW_STARTUP_PORT=${GW_STARTUP_PORT:-18180}
GW_STARTUP_ADMIN_PORT=${GW_STARTUP_ADMIN_PORT:-18190}
APIPATH=/api/data/v9.2

log() { printf '[load] %s\n' "$*" >&2; }
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
want() { [[ " $TARGETS " == *" $1 "* ]]; }

# --- what the run needs -------------------------------------------------------------
need_install=()
command -v wrk >/dev/null || need_install+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_install+=(nginx)
command -v python3 >/dev/null || need_install+=(python3)
want haproxy && { command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need_install+=(haproxy); }
want apache && { [ -x /usr/sbin/apache2 ] || need_install+=(apache2); }
want apache && { [ -f /usr/lib/apache2/modules/mod_auth_openidc.so ] || need_install+=(libapache2-mod-auth-openidc); }
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
  # The packages' system services (nginx, haproxy, apache2 on port 80) must not start:
  # a policy-rc.d answering 101 forbids it for the install, and they are stopped after it
  # in case the machine already allowed it.
  policy_added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    policy_added=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >/dev/null
  [ "$policy_added" = 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    for s in nginx haproxy apache2; do $SUDO systemctl disable --now "$s" >/dev/null 2>&1 || true; done
  fi
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
APACHE=/usr/sbin/apache2
APACHE_MODULES=/usr/lib/apache2/modules
# The idle-connection phase and 1,024 connections need a few thousand descriptors per process.
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
import json, os, socket, statistics, subprocess, sys, time, urllib.request, base64

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

def idle(port, n, token, path, marker, hold):
    """Opens n keep-alive connections, one GET on each, then holds them idle."""
    req = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
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

def tree(roots):
    """The root pids and all their descendants (nginx and Apache workers are children)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            parent[int(d)] = int(st.rsplit(")", 1)[1].split()[1])
    found, todo = set(), [int(r) for r in roots]
    while todo:
        p = todo.pop()
        if p in found or p not in parent:
            continue
        found.add(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return found

def cpu(roots):
    """utime + stime (clock ticks, all threads) summed over the process tree."""
    total = 0
    for p in tree(roots):
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])
    print(total)

def rss(roots):
    total = 0
    for p in tree(roots):
        try:
            for l in open(f"/proc/{p}/status"):
                if l.startswith("VmRSS:"):
                    total += int(l.split()[1])
        except OSError:
            pass
    print(total)

def tamper(token):
    """The same token with its signature changed (one byte of it flipped)."""
    h, p, s = token.split(".")
    sig = bytearray(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
    sig[len(sig) // 2] ^= 0x01
    return f"{h}.{p}." + base64.urlsafe_b64encode(bytes(sig)).rstrip(b"=").decode()

def verify(name, url, token, must_verify, body_path):
    """Good token 200 on every workload's path; if the peer verifies: a tampered and no token refused."""
    h = {"Authorization": f"Bearer {token}"}
    status, body = http_status(url + "/api/data/v9.2/accounts", h)
    if status != 200 or b'"value"' not in body:
        sys.exit(f"{name}: GET accounts with the good token: {status} {body[:200]!r}")
    status, body = http_status(url + "/api/data/v9.2/contacts", h)
    if status != 200 or len(body) < (1 << 20) - 4096:
        sys.exit(f"{name}: GET the 1 MiB contacts with the good token: {status}, {len(body)} bytes")
    payload = open(body_path, "rb").read()
    status, body = http_status(url + "/api/data/v9.2/echo", dict(h, **{"Content-Type": "application/json"}), payload)
    if status != 200 or body != payload:
        sys.exit(f"{name}: POST 1 MiB with the good token: {status}, {len(body)} bytes back (sent {len(payload)})")
    if must_verify:
        for what, hdr in (("a tampered signature", {"Authorization": f"Bearer {tamper(token)}"}), ("no token", {})):
            status, body = http_status(url + "/api/data/v9.2/accounts", hdr)
            if status not in (401, 403):
                sys.exit(f"{name} DOES NOT VERIFY: {what} got {status} {body[:200]!r}")
            print(f"{name}: {what} -> {status}")
    print(f"{name}: good token -> 200 on GET, 1 MiB GET and 1 MiB POST")

def pem(jwks_url, kid_of_token, out_pem, out_jwks):
    """The token's signing key from the IdP's JWKS: as a PEM public key (HAProxy) and a JWKS file."""
    doc = json.loads(urllib.request.build_opener(urllib.request.ProxyHandler({})).open(jwks_url, timeout=10).read())
    h = json.loads(base64.urlsafe_b64decode(kid_of_token.split(".")[0] + "=="))
    key = next(k for k in doc["keys"] if k.get("kid") == h.get("kid"))
    b = lambda v: int.from_bytes(base64.urlsafe_b64decode(v + "=" * (-len(v) % 4)), "big")
    def der_len(n):
        if n < 128: return bytes([n])
        s = n.to_bytes((n.bit_length() + 7) // 8, "big"); return bytes([0x80 | len(s)]) + s
    def tlv(tag, body): return bytes([tag]) + der_len(len(body)) + body
    def integer(v):
        s = v.to_bytes((v.bit_length() + 8) // 8, "big"); return tlv(0x02, s)
    rsa_pub = tlv(0x30, integer(b(key["n"])) + integer(b(key["e"])))
    alg = tlv(0x30, tlv(0x06, bytes.fromhex("2a864886f70d010101")) + b"\x05\x00")
    spki = tlv(0x30, alg + tlv(0x03, b"\x00" + rsa_pub))
    b64 = base64.b64encode(spki).decode()
    open(out_pem, "w").write("-----BEGIN PUBLIC KEY-----\n" + "\n".join(b64[i:i + 64] for i in range(0, len(b64), 64)) + "\n-----END PUBLIC KEY-----\n")
    open(out_jwks, "w").write(json.dumps({"keys": [key]}))

NAMES = {
    "direct": "upstream directly (nginx, 1 worker)",
    "nginx": "nginx plain proxy, no auth, access log off",
    "haproxy": "HAProxy `jwt_verify` (every request)",
    "apache": "Apache + mod_auth_openidc",
    "gateway": "**dynamics-gateway** (audit on, access rules, budget gate)",
    "gateway-wt1": "dynamics-gateway, `worker_threads: 1`",
    "gateway-wt2": "dynamics-gateway, `worker_threads: 2`",
    "gateway-h2": "dynamics-gateway, `upstream_http: http2` (h2c to the same upstream)",
}
WORKLOADS = [("get", "GET keep-alive"), ("close", "GET new connection per request"),
             ("post", "POST 1 MiB (echoed)"), ("big", "GET 1 MiB JSON")]

def table(results, mem, out, rounds):
    # line: target workload conns round requests duration_us p50_us p99_us socket_errors non2xx cpu_ticks rss_kib
    rows = {}
    for l in open(results):
        f = l.split()
        if len(f) < 12:
            continue
        rows.setdefault((f[0], f[1], int(f[2])), []).append(f)
    hz = os.sysconf("SC_CLK_TCK")
    agg = {}
    for k, rs in rows.items():
        rps = [int(r[4]) / (int(r[5]) / 1e6) for r in rs]
        agg[k] = {
            "rps": statistics.median(rps),
            "p99": statistics.median(int(r[7]) for r in rs) / 1000,
            "cpu": statistics.median(int(r[10]) / hz / max(int(r[4]), 1) * 1e6 for r in rs),
            "rss": statistics.median(int(r[11]) for r in rs) / 1024,
            "err": sum(int(r[8]) + int(r[9]) for r in rs),
            "n": len(rs),
        }
    L = [f"rps, p99, CPU per request and RSS: medians of {rounds} round(s); x nginx = the same workload through nginx as plain proxy; CPU per request = utime+stime of the target's processes (children included) over the run / requests; RSS = the target's processes after the run.", "",
         "| workload | target | conns | req/s | x nginx | p99 | p99 x nginx | CPU per request | x nginx | RSS after | errors |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = ["direct", "nginx", "haproxy", "apache", "gateway", "gateway-wt1", "gateway-wt2", "gateway-h2"]
    def line(w, wname, t, c):
        a = agg.get((t, w, c)); n = agg.get(("nginx", w, c))
        if not a:
            return
        x = lambda k: f"{a[k] / n[k]:.2f}" if n and n[k] else "-"
        L.append(f"| {wname} | {NAMES[t]} | {c} | {a['rps']:,.0f} | {x('rps')} | {a['p99']:.2f} ms | {x('p99')} | {a['cpu']:.0f} us | {x('cpu')} | {a['rss']:.1f} MiB | {a['err']} |")
    for w, wname in WORKLOADS:
        conns = sorted({c for (t, ww, c) in agg if ww == w})
        for c in conns:
            for t in order:
                line(w, wname, t, c)
    mems = [l.rstrip("\n").split("\t", 1) for l in open(mem) if "\t" in l]
    md = dict(mems)
    g = lambda w, c=64, t="gateway": agg.get((t, w, c))
    T = ["", "| issue 14 target | measured | met? |", "|---|---:|:---:|"]
    def target(label, value, ok):
        T.append(f"| {label} | {value} | {'met' if ok else '**missed**'} |")
    def ratio(t, w, k, c=64, other="nginx"):
        a, b = agg.get((t, w, c)), agg.get((other, w, c))
        return a[k] / b[k] if a and b and b[k] else None
    r = ratio("gateway", "get", "rps")
    if r is not None: target("keep-alive GET throughput >= 1.0x nginx", f"{r:.2f}x", r >= 1.0)
    r = ratio("gateway", "get", "p99")
    if r is not None: target("keep-alive GET p99 <= 1.1x nginx", f"{r:.2f}x", r <= 1.1)
    r = ratio("gateway", "get", "cpu")
    if r is not None: target("keep-alive GET CPU per request <= 1.1x nginx", f"{r:.2f}x", r <= 1.1)
    r = ratio("gateway", "get", "rps", other="haproxy")
    if r is not None: target("keep-alive GET >= 2x HAProxy `jwt_verify`", f"{r:.2f}x", r >= 2.0)
    r = ratio("gateway", "get", "rps", other="apache")
    if r is not None: target("keep-alive GET >= 5x Apache mod_auth_openidc", f"{r:.2f}x", r >= 5.0)
    r = ratio("gateway", "close", "rps")
    if r is not None: target("new connection per request >= 1.0x nginx", f"{r:.2f}x", r >= 1.0)
    for w, label in (("post", "1 MiB POST"), ("big", "1 MiB GET")):
        c = min((cc for (t, ww, cc) in agg if ww == w and t == "gateway"), default=None)
        r = ratio("gateway", w, "rps", c) if c else None
        if r is not None: target(f"{label} >= 1.0x nginx", f"{r:.2f}x", r >= 1.0)
    a, b = g("get", 1024), g("get", 64)
    na, nb = agg.get(("nginx", "get", 1024)), agg.get(("nginx", "get", 64))
    # At saturation p99 grows with the connections (Little's law): nginx's own ratio beside it.
    beside = f"; nginx {na['p99'] / nb['p99']:.2f}x" if na and nb else ""
    if a and b: target("no cliff: gateway p99 at 1,024 conns <= 4x p99 at 64", f"{a['p99'] / b['p99']:.2f}x ({a['p99']:.2f} / {b['p99']:.2f} ms{beside})", a["p99"] <= 4 * b["p99"])
    for k, v in mems:
        if k.startswith("gateway RSS after the first keep-alive GET run"):
            mib = float(v.split()[0]); target("gateway RSS after the keep-alive run < 20 MiB", v, mib < 20)
        if k.startswith("gateway RSS holding"):
            mib = float(v.split()[0]); target("2,000 idle keep-alive connections < 48 MiB", v, mib < 48)
        if k.startswith("start-up to ready"):
            ms = sorted(float(x) for x in v.split()); med = ms[len(ms) // 2]
            target("start-up to ready < 50 ms (median of the starts)", f"{med:.1f} ms", med < 50)
    L += T
    L += ["", "| memory / start-up | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in mems]
    text = "\n".join(L) + "\n"
    open(out, "w").write(text)
    print(text)

cmd = sys.argv[1]
if cmd == "launch-ready":
    launch_ready(sys.argv[2], sys.argv[3], sys.argv[4:])
elif cmd == "idle":
    idle(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], float(sys.argv[7]))
elif cmd == "verify":
    verify(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1", sys.argv[6])
elif cmd == "cpu":
    cpu(sys.argv[2:])
elif cmd == "rss":
    rss(sys.argv[2:])
elif cmd == "pem":
    pem(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
elif cmd == "table":
    table(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
PY
H="python3 $TMP/helper.py"

# wrk reports through done(): "requests duration_us p50_us p99_us socket_errors non2xx"
cat >"$TMP/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local e = summary.errors
  local f = io.open(os.getenv("WRK_OUT"), "w")
  f:write(string.format("%d %d %d %d %d %d\n", summary.requests, summary.duration,
    math.floor(latency:percentile(50)), math.floor(latency:percentile(99)),
    e.connect + e.read + e.write + e.timeout, e.status))
  f:close()
end
LUA
# The 1 MiB bodies: a JSON object (the gateway reads JSON bodies for links and access, so an
# opaque body would spare it work a real client's POST costs) and a 1 MiB JSON page.
python3 - "$TMP" <<'PY'
import json, sys
tmp = sys.argv[1]
body = json.dumps({"description": "x" * ((1 << 20) - 20)})
open(f"{tmp}/post.json", "w").write(body)
rows, row = [], 0
while sum(map(len, rows)) < (1 << 20) - 200:
    rows.append(json.dumps({"contactid": f"00000000-0000-0000-0000-{row:012d}", "fullname": f"Contact {row}",
                            "emailaddress1": f"contact{row}@contoso.example", "_parentcustomerid_value": None}))
    row += 1
open(f"{tmp}/contacts.json", "w").write('{"value":[' + ",".join(rows) + "]}")
PY
{
  echo 'wrk.method = "POST"'
  echo 'local f = io.open(os.getenv("POST_BODY"), "rb"); wrk.body = f:read("*a"); f:close()'
  echo 'wrk.headers["Content-Type"] = "application/json"'
  cat "$TMP/report.lua"
} >"$TMP/post.lua"

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f MiB", k / 1024}'; }
MEM=$OUT/memory.tsv
: >"$MEM"
USER_LINE=""; [ "$(id -u)" = 0 ] && USER_LINE="user root;"

# --- the stand-ins: the IdP (caller token, JWKS, S2S token) and Dataverse (/echo) --------
log "starting the local IdP (:$IDP_PORT) and the stand-in Dataverse (:$DV_PORT)"
"$STANDINS" --idp-port $IDP_PORT --dataverse-port $DV_PORT --out "$TMP/standins" >"$OUT/standins.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 300); do [ -f "$TMP/standins/ready" ] && break; sleep 0.05; done
[ -f "$TMP/standins/ready" ] || { log "stand-ins did not start"; cat "$OUT/standins.log"; exit 1; }
# shellcheck disable=SC1091
. "$TMP/standins/standins.env"
TOKEN=$(cat "$TMP/standins/caller.token")
JWKS_URI=$(python3 -c 'import json,sys,urllib.request as u; print(json.load(u.build_opener(u.ProxyHandler({})).open(sys.argv[1] + "/.well-known/openid-configuration"))["jwks_uri"])' "$ISSUER")
$H pem "$JWKS_URI" "$TOKEN" "$TMP/caller-key.pem" "$TMP/caller-jwks.json"
cp "$TMP/caller-key.pem" "$OUT/caller-key.pem"
# The stand-in's CSDL, served by the upstream nginx as $metadata for the gateway's access rules.
curl -sf --noproxy '*' -H "Authorization: Bearer $TOKEN" "$DATAVERSE_URL$APIPATH/\$metadata" -o "$TMP/csdl.xml" \
  || { log "could not read the stand-in's \$metadata"; exit 1; }

# --- the upstream: one nginx worker ------------------------------------------------------
# What both nginx configs share, up to the open `http {`: pid, logs and temp paths under
# the directory $1, $2 worker processes.
nginx_head() {
  cat <<NGINX
$USER_LINE
worker_processes $2;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $1/body;
  proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fastcgi;
  uwsgi_temp_path $1/uwsgi;
  scgi_temp_path $1/scgi;
NGINX
}
# A streaming proxy location's body, to the nginx upstream block named $1.
proxy_location() {
  cat <<NGINX
      proxy_pass http://$1;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_request_buffering off;
      proxy_buffering off;
NGINX
}

log "starting the upstream nginx, 1 worker (:$UP_PORT)"
mkdir -p "$TMP/up"
cp "$TMP/contacts.json" "$TMP/up/contacts.json"
{ nginx_head "$TMP/up" 1; cat <<NGINX; } >"$TMP/up/nginx.conf"
  upstream standin { server 127.0.0.1:$DV_PORT; keepalive 64; keepalive_requests 1000000; }
$(for listen in "$UP_PORT backlog=4096" "$UP2_PORT http2"; do cat <<SERVER
  server {
    listen 127.0.0.1:$listen;
    keepalive_requests 1000000;
    http2_max_requests 1000000;
    http2_max_concurrent_streams 1024;
    client_max_body_size 256m;
    default_type application/json;
    location / { return 200 '{"value":[]}'; }
    location = $APIPATH/contacts { alias $TMP/up/contacts.json; }
    location ~ ^$APIPATH/\\\$metadata\$ { default_type application/xml; alias $TMP/csdl.xml; }
    location = $APIPATH/echo {
$(proxy_location standin)
    }
  }
SERVER
done)
}
NGINX
cp "$TMP/up/nginx.conf" "$OUT/upstream-nginx.conf"
"$NGINX" -p "$TMP/up" -c "$TMP/up/nginx.conf" -e "$TMP/up/error.log" &
UP_PID=$!
PIDS+=("$UP_PID")
UP_URL="http://127.0.0.1:$UP_PORT"
UP2_URL="http://127.0.0.1:$UP2_PORT"

# --- nginx as plain proxy ----------------------------------------------------------------
if want nginx; then
  log "starting nginx as plain proxy (:$NGINX_PORT)"
  mkdir -p "$TMP/nginx"
  { nginx_head "$TMP/nginx" auto; cat <<NGINX; } >"$TMP/nginx/nginx.conf"
  upstream upstream { server 127.0.0.1:$UP_PORT; keepalive 64; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$NGINX_PORT backlog=4096;
    keepalive_requests 1000000;
    client_max_body_size 256m;
    location / {
$(proxy_location upstream)
    }
  }
}
NGINX
  cp "$TMP/nginx/nginx.conf" "$OUT/nginx.conf"
  "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" &
  NGINX_PID=$!
  PIDS+=("$NGINX_PID")
fi

# --- HAProxy with jwt_verify --------------------------------------------------------------
if want haproxy; then
  log "starting HAProxy with jwt_verify (:$HAPROXY_PORT)"
  mkdir -p "$TMP/haproxy"
  cp "$TMP/caller-key.pem" "$TMP/haproxy/caller-key.pem"
  cat >"$TMP/haproxy/haproxy.cfg" <<HAP
global
  maxconn 8000   # two descriptors per connection stay under a 20,000 hard limit
  pidfile $TMP/haproxy/haproxy.pid
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAPROXY_PORT
  # Every request: the signature (RS256, the IdP's public key), then issuer, audience, expiry.
  http-request set-var(txn.bearer) http_auth_bearer
  http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('\$.alg')
  http-request deny deny_status 401 unless { var(txn.alg) -m str RS256 }
  http-request deny deny_status 401 unless { var(txn.bearer),jwt_verify(txn.alg,"$TMP/haproxy/caller-key.pem") -m int 1 }
  http-request deny deny_status 401 unless { var(txn.bearer),jwt_payload_query('\$.iss') -m str $ISSUER }
  http-request deny deny_status 401 unless { var(txn.bearer),jwt_payload_query('\$.aud') -m str $AUDIENCE }
  http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('\$.exp','int')
  http-request set-var(txn.now) date()
  http-request deny deny_status 401 if { var(txn.exp),sub(txn.now) -m int lt 0 }
  default_backend upstream
backend upstream
  server up 127.0.0.1:$UP_PORT maxconn 0
HAP
  cp "$TMP/haproxy/haproxy.cfg" "$OUT/haproxy.cfg"
  "$HAPROXY" -c -q -f "$TMP/haproxy/haproxy.cfg" || { log "haproxy config invalid"; exit 1; }
  "$HAPROXY" -f "$TMP/haproxy/haproxy.cfg" -db >"$OUT/haproxy.log" 2>&1 &
  HAPROXY_PID=$!
  PIDS+=("$HAPROXY_PID")
fi

# --- Apache + mod_auth_openidc -------------------------------------------------------------
if want apache; then
  log "starting Apache + mod_auth_openidc (:$APACHE_PORT)"
  mkdir -p "$TMP/apache"
  cp "$TMP/caller-key.pem" "$TMP/apache/caller-key.pem"
  TOKEN_KID=$(python3 -c 'import base64,json,sys; h=sys.argv[1].split(".")[0]; print(json.loads(base64.urlsafe_b64decode(h + "=" * (-len(h) % 4)))["kid"])' "$TOKEN")
  APACHE_USER=""
  [ "$(id -u)" = 0 ] && APACHE_USER="User www-data
Group www-data"
  cat >"$TMP/apache/httpd.conf" <<APACHE
ServerRoot $TMP/apache
ServerName 127.0.0.1
Listen 127.0.0.1:$APACHE_PORT
PidFile $TMP/apache/httpd.pid
ErrorLog $TMP/apache/error.log
LogLevel warn
Mutex file:$TMP/apache default
DefaultRuntimeDir $TMP/apache
$APACHE_USER
LoadModule mpm_event_module $APACHE_MODULES/mod_mpm_event.so
LoadModule authn_core_module $APACHE_MODULES/mod_authn_core.so
LoadModule authz_core_module $APACHE_MODULES/mod_authz_core.so
LoadModule authz_user_module $APACHE_MODULES/mod_authz_user.so
LoadModule proxy_module $APACHE_MODULES/mod_proxy.so
LoadModule proxy_http_module $APACHE_MODULES/mod_proxy_http.so
LoadModule auth_openidc_module $APACHE_MODULES/mod_auth_openidc.so
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 60
# Debian's defaults for mpm_event (mods-available/mpm_event.conf), room for 1,024 connections
StartServers 2
ServerLimit 16
ThreadsPerChild 64
MaxRequestWorkers 1024
OIDCCryptoPassphrase $(head -c 24 /dev/urandom | base64)
# OAuth 2.0 resource server: the bearer JWT verified locally with the IdP's published key
# (OIDCOAuthVerifyJwksUri takes https URLs only; the stand-in IdP is plain http, so the key
# is given as the PEM converted from its JWKS, under the token's kid).
OIDCOAuthVerifyCertFiles $TOKEN_KID#$TMP/apache/caller-key.pem
OIDCOAuthRemoteUserClaim oid
OIDCOAuthAcceptTokenAs header
<Location "/">
  AuthType oauth20
  # As the gateway and HAProxy do: the issuer and the audience too (expiry is checked anyway).
  <RequireAll>
    Require valid-user
    Require claim iss:$ISSUER
    Require claim aud:$AUDIENCE
  </RequireAll>
</Location>
ProxyPass "/" "http://127.0.0.1:$UP_PORT/" keepalive=On
APACHE
  cp "$TMP/apache/httpd.conf" "$OUT/apache.conf"
  "$APACHE" -f "$TMP/apache/httpd.conf" -t >/dev/null 2>&1 || { "$APACHE" -f "$TMP/apache/httpd.conf" -t; exit 1; }
  "$APACHE" -f "$TMP/apache/httpd.conf" -DFOREGROUND >"$OUT/apache.log" 2>&1 &
  APACHE_PID=$!
  PIDS+=("$APACHE_PID")
fi

# --- the gateway ---------------------------------------------------------------------------
gateway_config() { # listen admin_listen [worker_threads] [upstream_http]
  cat <<YAML
server:
  listen: $1
  admin_listen: $2
  max_connections_per_peer: 0   # every wrk connection comes from 127.0.0.1
$([ -n "${3:-}" ] && echo "  worker_threads: $3")
inbound:
  issuers:
    - issuer: $ISSUER
      audiences: [$AUDIENCE]
      algorithms: [RS256, PS256, ES256]
identity:
  mode: caller_object_id
dynamics:
  url: $([ "${4:-}" = http2 ] && echo "$UP2_URL" || echo "$UP_URL")               # the cheapest upstream; its \$metadata is the stand-in's CSDL
$([ -n "${4:-}" ] && echo "  upstream_http: $4")
  tenant_id: $TENANT_ID
  client_id: $CLIENT_ID
  client_secret: $CLIENT_SECRET
  token_url: $TOKEN_URL      # the S2S token still comes from the stand-in IdP
  budget:                    # the local gate (no shared store), Dataverse's per-user limits
    max_concurrency: 52
    max_queue: 1024
    queue_timeout: 10s
access:
  default: deny
  rules:
    - name: bench-app
      when: { scp: [user_impersonation] }
      allow: { methods: [GET, POST], entity_sets: [accounts, contacts, echo] }
YAML
}
gateway_config "127.0.0.1:$GW_PORT" "127.0.0.1:$GW_ADMIN_PORT" >"$TMP/gateway.yaml"
gateway_config "127.0.0.1:$GW1_PORT" "127.0.0.1:$GW1_ADMIN_PORT" 1 >"$TMP/gateway-wt1.yaml"
gateway_config "127.0.0.1:$GW2_PORT" "127.0.0.1:$GW2_ADMIN_PORT" 2 >"$TMP/gateway-wt2.yaml"
gateway_config "127.0.0.1:$GWH2_PORT" "127.0.0.1:$GWH2_ADMIN_PORT" "" http2 >"$TMP/gateway-h2.yaml"
gateway_config "127.0.0.1:$GW_STARTUP_PORT" "127.0.0.1:$GW_STARTUP_ADMIN_PORT" >"$TMP/gateway-startup.yaml"
cp "$TMP/gateway.yaml" "$OUT/gateway.yaml"
# RUST_LOG as the gateway's own default: info, so every request writes its audit line.
export GW_RUST_LOG=${GW_RUST_LOG:-info,hyper=warn,reqwest=warn}

for _ in $(seq 1 100); do [ "$($H verify upstream "$UP_URL" "$TOKEN" 0 "$TMP/post.json" 2>/dev/null | wc -l)" -gt 0 ] && break; sleep 0.05; done

log "measuring the gateway's start-up-to-ready time (5 starts)"
startups=()
for _ in 1 2 3 4 5; do
  read -r spid sms < <(RUST_LOG=$GW_RUST_LOG $H launch-ready "http://127.0.0.1:$GW_STARTUP_ADMIN_PORT/readyz" "$OUT/gateway-startup.log" \
    "$GATEWAY" --config "$TMP/gateway-startup.yaml" --log-format json run)
  kill "$spid" 2>/dev/null || true
  while kill -0 "$spid" 2>/dev/null; do sleep 0.01; done
  [ "$sms" != -1 ] || { log "gateway did not become ready"; cat "$OUT/gateway-startup.log"; exit 1; }
  startups+=("$sms")
done
sorted=$(printf '%s\n' "${startups[@]}" | sort -n | tr '\n' ' ')
printf 'start-up to ready (5 starts, ms, sorted)\t%s\n' "$sorted" >>"$MEM"

declare -A URL=([direct]="$UP_URL" [nginx]="http://127.0.0.1:$NGINX_PORT" [haproxy]="http://127.0.0.1:$HAPROXY_PORT"
  [apache]="http://127.0.0.1:$APACHE_PORT" [gateway]="http://127.0.0.1:$GW_PORT"
  [gateway-wt1]="http://127.0.0.1:$GW1_PORT" [gateway-wt2]="http://127.0.0.1:$GW2_PORT"
  [gateway-h2]="http://127.0.0.1:$GWH2_PORT")
declare -A PID=([direct]="$UP_PID" [nginx]="${NGINX_PID:-}" [haproxy]="${HAPROXY_PID:-}" [apache]="${APACHE_PID:-}")
start_gateway() { # target config admin_port
  local pid ms
  read -r pid ms < <(RUST_LOG=$GW_RUST_LOG $H launch-ready "http://127.0.0.1:$3/readyz" "$OUT/$1.log" \
    "$GATEWAY" --config "$2" --log-format json run)
  PIDS+=("$pid")
  [ "$ms" != -1 ] || { log "$1 did not become ready"; tail -20 "$OUT/$1.log"; exit 1; }
  PID[$1]=$pid
}
want gateway && { log "starting the gateway (:$GW_PORT)"; start_gateway gateway "$TMP/gateway.yaml" $GW_ADMIN_PORT; }
want gateway-wt1 && start_gateway gateway-wt1 "$TMP/gateway-wt1.yaml" $GW1_ADMIN_PORT
want gateway-wt2 && start_gateway gateway-wt2 "$TMP/gateway-wt2.yaml" $GW2_ADMIN_PORT
want gateway-h2 && start_gateway gateway-h2 "$TMP/gateway-h2.yaml" $GWH2_ADMIN_PORT
want gateway && printf 'gateway RSS when ready\t%s\n' "$(mib "$(rss_kib "${PID[gateway]}")")" >>"$MEM"

# --- every peer must pass the good token and refuse a bad one --------------------------------
: >"$OUT/verify.txt"
log "checking every target: the good token passes; the verifying ones refuse a tampered signature and no token"
for t in $TARGETS; do
  case $t in direct|nginx) must=0 ;; *) must=1 ;; esac
  ok=0
  for _ in $(seq 1 100); do
    if $H verify "$t" "${URL[$t]}" "$TOKEN" $must "$TMP/post.json" >"$TMP/verify.out" 2>&1; then ok=1; break; fi
    grep -q "DOES NOT VERIFY" "$TMP/verify.out" && break
    sleep 0.1
  done
  cat "$TMP/verify.out" | tee -a "$OUT/verify.txt" >&2
  [ "$ok" = 1 ] || { log "FAILED: $t (see above); its log: $OUT"; exit 1; }
done

# --- the measured runs -------------------------------------------------------------------------
RESULTS=$OUT/wrk.txt
: >"$RESULTS"
run_wrk() { # target workload conns round
  local target=$1 workload=$2 conns=$3 round=$4 path=$APIPATH/accounts script=$TMP/report.lua c0 c1 extra=()
  case $workload in
    post) path=$APIPATH/echo; script=$TMP/post.lua ;;
    big) path=$APIPATH/contacts ;;
    close) extra=(-H "Connection: close") ;;
  esac
  c0=$($H cpu "${PID[$target]}")
  WRK_OUT=$TMP/last.txt POST_BODY=$TMP/post.json \
    wrk -t2 -c"$conns" -d"${DURATION}s" --timeout 10s --latency -s "$script" \
    -H "Authorization: Bearer $TOKEN" "${extra[@]}" "${URL[$target]}$path" >>"$OUT/wrk-$target-$workload-$conns.log" 2>&1
  c1=$($H cpu "${PID[$target]}")
  echo "$target $workload $conns $round $(cat "$TMP/last.txt") $((c1 - c0)) $($H rss "${PID[$target]}")" >>"$RESULTS"
}
workloads_of() {
  case $1 in
    gateway-wt1|gateway-wt2) echo "get:64" ;;
    gateway-h2) echo "get:64 get:256 post:16 big:16" ;;
    gateway|nginx) echo "get:64 get:256 get:1024 close:64 post:16 big:16" ;;
    *) echo "get:64 close:64 post:16 big:16" ;;
  esac
}
for t in $TARGETS; do
  WRK_OUT=/dev/null wrk -t2 -c64 -d"${WARMUP}s" -s "$TMP/report.lua" -H "Authorization: Bearer $TOKEN" "${URL[$t]}$APIPATH/accounts" >/dev/null 2>&1
done
for round in $(seq 1 "$ROUNDS"); do
  for t in $TARGETS; do
    log "round $round/$ROUNDS: $t: $(workloads_of "$t") (${DURATION}s each)"
    for wc in $(workloads_of "$t"); do
      run_wrk "$t" "${wc%:*}" "${wc#*:}" "$round"
      # The keep-alive target is judged on round 1's run: later rounds follow the 1 MiB runs,
      # whose buffers the allocator keeps.
      if [ "$t" = gateway ] && [ "$round" = 1 ] && [ "$wc" = get:64 ]; then
        printf 'gateway RSS after the first keep-alive GET run (before any 1 MiB body)\t%s\n' "$(mib "$(rss_kib "${PID[gateway]}")")" >>"$MEM"
      fi
      if [ "$t" = gateway ] && [ "$round" = "$ROUNDS" ]; then
        case $wc in
          get:64) printf 'gateway RSS after the keep-alive GET run (last round)\t%s\n' "$(mib "$(rss_kib "${PID[gateway]}")")" >>"$MEM" ;;
          post:16) printf 'gateway RSS after the 1 MiB POST run\t%s\n' "$(mib "$(rss_kib "${PID[gateway]}")")" >>"$MEM" ;;
          big:16) printf 'gateway RSS after the 1 MiB GET run\t%s\n' "$(mib "$(rss_kib "${PID[gateway]}")")" >>"$MEM"
                  printf 'gateway peak RSS (VmHWM) so far\t%s\n' "$(mib "$(hwm_kib "${PID[gateway]}")")" >>"$MEM" ;;
        esac
      fi
    done
  done
done
# What the gateway reports of its environment (S2S token, keys, $metadata for the access rules).
want gateway && curl -s --noproxy '*' "http://127.0.0.1:$GW_ADMIN_PORT/readyz" >"$OUT/gateway-readyz.txt" || true
want gateway && printf 'gateway audit lines written (log file)\t%s\n' "$(grep -c 'dynamics_gateway::audit' "$OUT/gateway.log" || true)" >>"$MEM"

# --- 2,000 idle keep-alive connections held open on a fresh gateway -----------------------
# A fresh process (the start-up config), so the number is what the connections cost, not
# what the allocator kept from the 1 MiB runs before (the measured gateway's RSS after them
# is in the table).
if want gateway; then
  log "holding $IDLE_CONNECTIONS idle keep-alive connections on a fresh gateway"
  read -r IDLE_GW_PID ims < <(RUST_LOG=$GW_RUST_LOG $H launch-ready "http://127.0.0.1:$GW_STARTUP_ADMIN_PORT/readyz" "$OUT/gateway-idle.log" \
    "$GATEWAY" --config "$TMP/gateway-startup.yaml" --log-format json run)
  PIDS+=("$IDLE_GW_PID")
  [ "$ims" != -1 ] || { log "the fresh gateway did not become ready"; tail -20 "$OUT/gateway-idle.log"; exit 1; }
  fresh_rss=$(rss_kib "$IDLE_GW_PID")
  $H idle $GW_STARTUP_PORT "$IDLE_CONNECTIONS" "$TOKEN" "$APIPATH/accounts" "$TMP/idle.marker" 4 &
  IDLE_PID=$!
  PIDS+=("$IDLE_PID")
  for _ in $(seq 1 600); do [ -f "$TMP/idle.marker" ] && break; sleep 0.05; done
  sleep 1
  idle_rss=$(rss_kib "$IDLE_GW_PID")
  wait "$IDLE_PID" || true
  kill "$IDLE_GW_PID" 2>/dev/null || true
  printf 'gateway RSS holding %s idle keep-alive connections (fresh process, %s when ready; %s answered 200, %s still open 4 s later)\t%s\n' \
    "$IDLE_CONNECTIONS" "$(mib "$fresh_rss")" "$(cat "$TMP/idle.marker")" "$(cat "$TMP/idle.marker.after" 2>/dev/null || echo '?')" "$(mib "$idle_rss")" >>"$MEM"
fi

# --- optional soak ----------------------------------------------------------------------
if want gateway && [ "${SOAK:-0}" -gt 0 ]; then
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
    return wrk.format("GET", "/api/data/v9.2/accounts", {["Authorization"] = "Bearer not.a.token"})
  end
  return wrk.format("GET", "/api/data/v9.2/accounts", {["Authorization"] = good})
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
  warm_rss=$(rss_kib "${PID[gateway]}")
  soak_run "$SOAK" "$OUT/soak.txt"
  end_rss=$(rss_kib "${PID[gateway]}")
  read -r s_ok s_refused s_unexpected s_socket s_total <"$OUT/soak.txt"
  printf 'soak %s s, 200 conns: requests / 200 / 401 (bad token) / unexpected status / socket errors\t%s / %s / %s / %s / %s\n' \
    "$SOAK" "$s_total" "$s_ok" "$s_refused" "$s_unexpected" "$s_socket" >>"$MEM"
  printf 'soak: gateway RSS after warm-up -> at the end\t%s -> %s\n' "$(mib "$warm_rss")" "$(mib "$end_rss")" >>"$MEM"
fi

# --- optional profile ------------------------------------------------------------------
# One perf recording per workload, so each missed target has the profile that explains it:
# perf-<workload>-dso.txt and perf-<workload>-symbols.txt (get's also as perf-dso.txt and
# perf-symbols.txt, the names earlier runs used).
profile_workload() { # workload conns path [wrk args...]
  local workload=$1 conns=$2 path=$3
  shift 3
  log "profiling the gateway under the $workload workload (perf, cpu-clock, ${DURATION}s)"
  perf record -e cpu-clock -F 999 -p "${PID[gateway]}" -o "$OUT/perf-$workload.data" -- sleep "$DURATION" >/dev/null 2>&1 &
  PERF_PID=$!
  WRK_OUT=/dev/null POST_BODY=$TMP/post.json \
    wrk -t2 -c"$conns" -d"${DURATION}s" -H "Authorization: Bearer $TOKEN" "$@" "${URL[gateway]}$path" >/dev/null 2>&1
  wait "$PERF_PID" || true
  perf report -i "$OUT/perf-$workload.data" --no-children --sort dso --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' \
    | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' | head -15 >"$OUT/perf-$workload-dso.txt" || true
  perf report -i "$OUT/perf-$workload.data" --no-children --sort symbol --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' \
    | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' | head -60 >"$OUT/perf-$workload-symbols.txt" || true
}
if want gateway && [ "${PROFILE:-0}" = 1 ]; then
  profile_workload get 64 "$APIPATH/accounts" -s "$TMP/report.lua"
  cp "$OUT/perf-get-dso.txt" "$OUT/perf-dso.txt"
  cp "$OUT/perf-get-symbols.txt" "$OUT/perf-symbols.txt"
  profile_workload close 64 "$APIPATH/accounts" -s "$TMP/report.lua" -H "Connection: close"
  profile_workload post 16 "$APIPATH/echo" -s "$TMP/post.lua"
  profile_workload big 16 "$APIPATH/contacts" -s "$TMP/report.lua"
  log "profiles: $OUT/perf-<workload>-dso.txt, $OUT/perf-<workload>-symbols.txt"
fi

{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load average before the run: $LOAD_BEFORE"
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "versions: $("$GATEWAY" --version), $("$NGINX" -v 2>&1 | sed 's/.*: //'), $("$HAPROXY" -v 2>/dev/null | awk 'NR == 1 {print $1 "/" $3}'), $("$APACHE" -v 2>/dev/null | awk -F': ' 'NR == 1 {print $2}'), mod_auth_openidc $(dpkg-query -W -f '${Version}' libapache2-mod-auth-openidc 2>/dev/null || echo '?'), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $(rustc --version | cut -d' ' -f1-2), kernel $(uname -r)"
  echo "runs: ${DURATION}s each, ${ROUNDS} round(s) interleaved, after a ${WARMUP}s warm-up per target; wrk -t2; token $(printf %s "$TOKEN" | wc -c) bytes RS256; upstream nginx worker_processes 1, proxy nginx worker_processes auto ($(nproc))"
  echo
} >"$OUT/table.md"
$H table "$RESULTS" "$MEM" "$OUT/table.tmp" "$ROUNDS" >/dev/null
cat "$OUT/table.tmp" >>"$OUT/table.md"
rm -f "$OUT/table.tmp"
cat "$OUT/table.md"
log "results: $OUT (table.md)"
