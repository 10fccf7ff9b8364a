#!/usr/bin/env bash
# Make sure a Redis answers at REDIS_URL; start the project's own one if none does.
#
#   scripts/ensure_redis.sh [--print-url] [--fallback-port]
#
# REDIS_URL comes from the environment, else from REDIS_URL= in the repository's .env (as
# config/settings.py reads it), else redis://127.0.0.1:6379/0.
#
# - A Redis answers PING there: use it (nothing is started).
# - Nothing listens there and the host is this machine (localhost, 127.x, ::1): start
#   `redis-server config/redis.conf` daemonized on that port, with its data, pidfile and log in
#   .run/redis/<port>/, installing Debian's redis-server first if it is missing. The server keeps
#   running after this script (and `make run`) ends: `make redis-stop` stops it.
# - The host is another machine and nothing answers: error, exit 1.
#
# --print-url      print the URL to use on stdout (every message goes to stderr), for Makefiles.
# --fallback-port  when something that is not a usable Redis (another service, a Redis that wants a
#                  password, ...) holds a local port, start a private Redis on a free port from
#                  6390 instead of failing; --print-url then prints that URL. `make test` uses it.
#
# Environment: REDIS_START_TIMEOUT (seconds to wait for a started server's PONG, default 10).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONF="$ROOT/config/redis.conf"
RUN_DIR="$ROOT/.run/redis"
START_TIMEOUT=${REDIS_START_TIMEOUT:-10}
DEFAULT_URL="redis://127.0.0.1:6379/0"

PRINT_URL=0
FALLBACK=0
for arg in "$@"; do
    case "$arg" in
        --print-url) PRINT_URL=1 ;;
        --fallback-port) FALLBACK=1 ;;
        -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "redis: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

log() { echo "redis: $*" >&2; }
die() { echo "redis: error: $*" >&2; exit 1; }

command -v python3 >/dev/null 2>&1 || die "python3 is needed (to parse REDIS_URL)"

# --- Which URL.
URL=${REDIS_URL:-}
if [[ -z "$URL" && -f "$ROOT/.env" ]]; then
    URL=$(sed -n -E 's/^[[:space:]]*(export[[:space:]]+)?REDIS_URL[[:space:]]*=[[:space:]]*//p' "$ROOT/.env" \
          | tail -n 1 | sed -E "s/[[:space:]]+$//; s/^\"(.*)\"$/\1/; s/^'(.*)'$/\1/")
    [[ -n "$URL" ]] && log "REDIS_URL from .env"
fi
URL=${URL:-$DEFAULT_URL}

# --- Parse it (python's urllib copes with IPv6 hosts, %-escaped passwords, ...). Sets SCHEME HOST
# PORT USERNAME PASSWORD DB, PREFIX (scheme://userinfo@host:) SUFFIX (/db?query) and SAFE_URL.
PARSED=$(python3 - "$URL" <<'PY'
import shlex, sys
from urllib.parse import parse_qs, unquote, urlsplit
url = sys.argv[1]
def die(msg):
    print(f"die {shlex.quote(msg)}")
    raise SystemExit
try:
    u = urlsplit(url)
    port = u.port or 6379
except ValueError as e:
    die(f"bad REDIS_URL {url!r}: {e}")
if u.scheme not in ("redis", "rediss"):
    die(f"REDIS_URL {url!r}: only redis:// and rediss:// URLs are handled here")
db = u.path.strip("/") or parse_qs(u.query).get("db", ["0"])[0]
if not db.isdigit():
    die(f"REDIS_URL {url!r}: the database must be a number, not {db!r}")
host = u.hostname or "127.0.0.1"
hostpart = f"[{host}]" if ":" in host else host
userinfo = u.netloc.rpartition("@")[0]
prefix = f"{u.scheme}://" + (userinfo + "@" if userinfo else "") + hostpart + ":"
suffix = u.path + (f"?{u.query}" if u.query else "")
safe_userinfo = ""
if userinfo:
    safe_userinfo = (u.username or "") + (":***" if u.password is not None else "") + "@"
safe = f"{u.scheme}://{safe_userinfo}{hostpart}:{port}{suffix}"
for k, v in dict(SCHEME=u.scheme, HOST=host, PORT=str(port), DB=db,
                 USERNAME=unquote(u.username) if u.username else "",
                 PASSWORD=unquote(u.password) if u.password else "",
                 PREFIX=prefix, SUFFIX=suffix, SAFE_URL=safe).items():
    print(f"{k}={shlex.quote(v)}")
PY
) || die "python3 failed to parse REDIS_URL"
eval "$PARSED"

url_for_port() { echo "${PREFIX}$1${SUFFIX}"; }
safe_url_for_port() { echo "${SAFE_URL/:$PORT/:$1}"; }

# --- probe PORT: PING HOST:PORT as the URL's user, password and db would.
# 0 = answered PONG; 1 = nothing listens (refused, unreachable);
# 2 = something answered, but not PONG (PROBE_REPLY holds what it said).
PROBE_REPLY=""
probe() {
    local port=$1 out rc=0
    if command -v redis-cli >/dev/null 2>&1; then
        # Not `redis-cli -u`: redis-cli 7.0 fails AUTH for redis://:password@ URLs and does not
        # %-decode passwords. The password goes in the environment, not on the command line.
        local args=(-h "$HOST" -p "$port" -n "$DB")
        [[ "$SCHEME" == rediss ]] && args+=(--tls)
        [[ -n "$USERNAME" ]] && args+=(--user "$USERNAME")
        local auth=()   # an empty REDISCLI_AUTH would still make redis-cli send AUTH
        [[ -n "$PASSWORD" ]] && auth=(REDISCLI_AUTH="$PASSWORD")
        out=$(env "${auth[@]}" timeout 5 redis-cli "${args[@]}" PING 2>&1 </dev/null) || rc=$?
        out=$(echo "$out" | tr -d '\r' | grep -v -e '^$' -e '^Warning:' || true)
        PROBE_REPLY=$(echo "$out" | tail -n 1)
        # redis-cli goes on to PING after a failed AUTH or SELECT; a client of the URL would not.
        if grep -qE '^(AUTH|SELECT [0-9]+) failed' <<<"$out"; then
            PROBE_REPLY=$(grep -m1 -E '^(AUTH|SELECT [0-9]+) failed' <<<"$out")
            return 2
        fi
        if grep -qx 'PONG' <<<"$out"; then return 0; fi
        if [[ $rc -eq 124 ]]; then
            PROBE_REPLY="no answer within 5 s"
            [[ "$LOCAL" == 1 ]] && return 2 || return 1
        fi
        if grep -qiE 'could not connect|connection refused|cannot assign|network is unreachable|no route to host|name or service not known|temporary failure in name resolution' <<<"$out"; then
            return 1
        fi
        return 2
    fi
    # No redis-cli: a tiny RESP client (AUTH, SELECT, PING) in python's standard library.
    PROBE_REPLY=$(PROBE_PASSWORD="$PASSWORD" python3 - "$SCHEME" "$HOST" "$port" "$DB" "$USERNAME" <<'PY'
import os, socket, ssl, sys
scheme, host, port, db, user = sys.argv[1:]
password = os.environ.get("PROBE_PASSWORD", "")
def cmd(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        b = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(b), b)
    return out
try:
    s = socket.create_connection((host, int(port)), timeout=5)
except OSError as e:
    print(f"nothing: {e}")
    raise SystemExit
try:
    if scheme == "rediss":
        s = ssl.create_default_context().wrap_socket(s, server_hostname=host)
    f = s.makefile("rb")
    steps = []
    if password:
        steps.append(cmd("AUTH", user, password) if user else cmd("AUTH", password))
    if db != "0":
        steps.append(cmd("SELECT", db))
    for step in steps:
        s.sendall(step)
        line = f.readline().decode(errors="replace").strip()
        if not line.startswith("+OK"):
            print(line or "connection closed"); raise SystemExit
    s.sendall(cmd("PING"))
    line = f.readline().decode(errors="replace").strip()
    print("PONG" if line == "+PONG" else (line or "connection closed"))
except OSError as e:
    print(f"error: {e}")
PY
) || true
    case "$PROBE_REPLY" in
        PONG) return 0 ;;
        nothing:*) return 1 ;;
        *) return 2 ;;
    esac
}

LOCAL=0
case "$HOST" in
    localhost|127.*|::1) LOCAL=1 ;;
esac

finish() {  # finish URL SAFE_URL
    [[ "$PRINT_URL" == 1 ]] && echo "$1"
    exit 0
}

# --- 1. A Redis already answers: use it.
set +e; probe "$PORT"; state=$?; set -e
if [[ $state -eq 0 ]]; then
    log "using the Redis at $SAFE_URL"
    finish "$URL"
fi

if [[ "$LOCAL" != 1 ]]; then
    if [[ $state -eq 2 ]]; then
        die "the server at $SAFE_URL does not answer PING with PONG: ${PROBE_REPLY:-?}"
    fi
    die "no Redis answers at $SAFE_URL (${PROBE_REPLY:-no answer}); $HOST is not this machine, so nothing was started. Start Redis there, or point REDIS_URL at one."
fi
if [[ "$SCHEME" == rediss ]]; then
    die "no Redis answers at $SAFE_URL; not starting one: the project's own Redis speaks plain redis://, not TLS (rediss://)"
fi

# --- 2. Local and nothing usable: the project's own redis-server.
install_redis_server() {
    command -v apt-get >/dev/null 2>&1 \
        || die "redis-server is not installed and there is no apt-get here: install Redis (>= 6.2) yourself, or set REDIS_URL to a Redis that runs"
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 \
            || die "redis-server is not installed; to install it run as root: apt-get update && apt-get install -y redis-server"
        sudo=(sudo)
    fi
    log "redis-server is not installed; installing Debian's package: ${sudo[*]:+${sudo[*]} }apt-get update && ${sudo[*]:+${sudo[*]} }apt-get install -y redis-server"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 \
        || die "apt-get update failed"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2 \
        || die "apt-get install redis-server failed"
    command -v redis-server >/dev/null 2>&1 || die "redis-server is still not on PATH after installing it"
    log "installed $(redis-server --version | head -n 1)"
}

# ours_alive PORT: the redis-server this script started on PORT still runs (its pidfile names a
# live redis-server process).
ours_alive() {
    local pidfile="$RUN_DIR/$1/redis.pid" pid
    [[ -s "$pidfile" ]] || return 1
    pid=$(cat "$pidfile")
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
        && { [[ ! -d /proc/self ]] || grep -q redis "/proc/$pid/comm" 2>/dev/null; }
}

# start_private PORT: start (or wait for) the project's own redis-server on PORT.
start_private() {
    local port=$1 dir="$RUN_DIR/$1"
    local pidfile="$dir/redis.pid" logfile="$dir/redis.log"
    mkdir -p "$dir"
    if ours_alive "$port"; then
        log "the project's redis-server on port $port (pid $(cat "$pidfile")) runs but did not answer yet; waiting for it"
    else
        local args=("$CONF" --port "$port" --dir "$dir" --pidfile "$pidfile" --logfile "$logfile" --daemonize yes)
        local major
        major=$(redis-server --version | sed -n -E 's/.* v=([0-9]+)\..*/\1/p')
        if [[ -n "$major" && "$major" -lt 7 ]]; then
            args+=(--bind 127.0.0.1)   # "bind ... -::1" in redis.conf needs Redis >= 7
        fi
        if [[ -n "$PASSWORD" ]]; then
            [[ -n "$USERNAME" && "$USERNAME" != default ]] \
                && log "warning: the URL names user '$USERNAME'; the started server only sets a password for the default user"
            args+=(--requirepass "$PASSWORD")
        fi
        if ! redis-server "${args[@]}" >&2; then
            [[ -f "$logfile" ]] && tail -n 20 "$logfile" >&2
            die "redis-server failed to start on port $port (log: $logfile)"
        fi
    fi
    local deadline=$((SECONDS + START_TIMEOUT))
    while :; do
        set +e; probe "$port"; local st=$?; set -e
        [[ $st -eq 0 ]] && break
        if (( SECONDS >= deadline )); then
            [[ -f "$logfile" ]] && tail -n 20 "$logfile" >&2
            die "the redis-server started on port $port did not answer PING within ${START_TIMEOUT}s (last: ${PROBE_REPLY:-nothing}; log: $logfile)"
        fi
        sleep 0.2
    done
}

if ! command -v redis-server >/dev/null 2>&1; then
    install_redis_server
    # Debian's package may have started its own service on the port we want.
    set +e; probe "$PORT"; state=$?; set -e
    if [[ $state -eq 0 ]]; then
        log "using the Redis at $SAFE_URL (the service of the redis-server package just installed)"
        finish "$URL"
    fi
fi

if [[ $state -eq 1 ]]; then
    start_private "$PORT"
    log "none answered at $SAFE_URL; started redis-server (config/redis.conf, data in .run/redis/$PORT) on port $PORT"
    finish "$URL"
fi

# Something that is not a usable Redis holds the port.
if [[ "$FALLBACK" != 1 ]]; then
    die "something on port $PORT answers, but not as a usable Redis: ${PROBE_REPLY:-?}. Free the port, fix REDIS_URL, or point it at another port."
fi
log "port $PORT is taken by something that is not a usable Redis (${PROBE_REPLY:-?}); looking for a free port from 6390"
for port in $(seq 6390 6409); do
    [[ "$port" == "$PORT" ]] && continue
    url=$(url_for_port "$port")
    set +e; probe "$port"; st=$?; set -e
    if [[ $st -eq 0 ]] && ours_alive "$port"; then
        log "using the project's own Redis at $(safe_url_for_port "$port") (started earlier, data in .run/redis/$port)"
        finish "$url"
    fi
    if [[ $st -eq 1 ]]; then
        start_private "$port"
        log "none usable at $SAFE_URL; started redis-server (config/redis.conf, data in .run/redis/$port) on port $port: use $(safe_url_for_port "$port")"
        finish "$url"
    fi
done
die "no free port in 6390-6409 for a private Redis"
