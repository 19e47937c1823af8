#!/usr/bin/env bash
# Smoke test of the Warden node image: build it with build.sh (buildah, nothing pulled),
# run a 3-node cluster of it under podman + runc — read-only root filesystem with no
# tmpfs at all, uid 65532, every capability dropped, host network on 127.0.0.1 — push
# billing jobs through it, SIGTERM one container and check that it drains, hands off
# and exits 0, and that the other two take every partition and keep working.
#
#   ./deploy/pg.sh run deploy/image/smoke.sh [--profile debug|release] [--image NAME]
#                                             [--jobs N] [--accounts N] [--keep-image]
#
#   --profile     cargo profile of the node and the CLI (default: debug, to save build time)
#   --image       image name (default: localhost/warden-node:smoke); removed at the end
#                 unless --keep-image
#   --jobs        charges per wave (default 300; each is followed by invoice and notify)
#   --accounts    accounts the charges are spread over (default 50)
#   --use-image   test this existing image instead of building one with build.sh (e.g.
#                 one built from the Dockerfile); it is kept
#
# Needs root (podman with runc, host network), DATABASE_URL (a PostgreSQL on this
# machine the containers reach over 127.0.0.1; the test makes and drops its own
# database there), python3 and psql. buildah, podman and runc are installed with
# apt-get if missing (non-interactive). Podman gets a private containers.conf and
# signature policy (CONTAINERS_CONF, WARDEN_SIGNATURE_POLICY): nothing under
# /etc/containers is read or written. WARDEN_CARGO overrides `cargo` (e.g. a flock
# wrapper). Exit status: 0 PASS, 1 FAIL, 2 usage.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"

profile=debug
image=localhost/warden-node:smoke
jobs=300
accounts=50
keep_image=0
use_image=0
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
        --image) image="${2:?--image needs a value}"; shift 2 ;;
        --jobs) jobs="${2:?--jobs needs a value}"; shift 2 ;;
        --accounts) accounts="${2:?--accounts needs a value}"; shift 2 ;;
        --keep-image) keep_image=1; shift ;;
        --use-image) image="${2:?--use-image needs a value}"; use_image=1; keep_image=1; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "smoke: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
case "$profile" in
    debug | dev) profile=debug; cargo_profile=dev ;;
    release) cargo_profile=release ;;
    *) echo "smoke: --profile must be debug or release" >&2; exit 2 ;;
esac

# Every wait has a deadline (seconds).
READY_TIMEOUT=${SMOKE_READY_TIMEOUT:-120}  # podman run -> /readyz 200 and a 3-member ring
JOBS_TIMEOUT=${SMOKE_JOBS_TIMEOUT:-240}    # a wave of charges -> every chain finished
STOP_TIMEOUT=${SMOKE_STOP_TIMEOUT:-60}     # SIGTERM -> exit (the node's budget is ~12 s)
RING_TIMEOUT=${SMOKE_RING_TIMEOUT:-60}     # exit -> the remaining nodes hold every partition

# ---------------------------------------------------------------- reporting
t_start=$(date +%s.%N)
timings=()
failed=""
now() { date +%s.%N; }
secs() { awk "BEGIN { printf \"%.1f\", $2 - $1 }"; }
log() { printf '[smoke %6ss] %s\n' "$(secs "$t_start" "$(now)")" "$*" >&2; }
timing() { timings+=("$(printf '%-50s %s' "$1" "$2")"); log "$1: $2"; }
fail() {
    failed="$*"
    log "FAIL: $*"
    exit 1
}

# ---------------------------------------------------------------- prerequisites
[ "$(id -u)" = 0 ] || { echo "smoke: run as root (podman with runc on the host network)" >&2; exit 1; }
[ -n "${DATABASE_URL:-}" ] || {
    echo "smoke: DATABASE_URL is not set; run it as ./deploy/pg.sh run deploy/image/smoke.sh" >&2
    exit 1
}
PSQL="$(command -v psql || echo "${PGBIN:-/usr/lib/postgresql/15/bin}/psql")"
[ -x "$PSQL" ] || { echo "smoke: psql not found (PGBIN?)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "smoke: python3 not found" >&2; exit 1; }

missing=()
for tool in buildah podman runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (apt-get)"
    t=$(now)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends buildah podman runc >/dev/null
    timing "apt-get install buildah podman runc" "$(secs "$t" "$(now)")s"
fi

work="$(mktemp -d /tmp/warden-smoke.XXXXXX)"
chmod 0755 "$work"
# Podman and buildah read only this file (CONTAINERS_CONF replaces the system ones).
# default_ulimits = []: podman's default raises RLIMIT_NOFILE, which a sandbox or CI
# container may refuse ("error setting rlimit type 7: operation not permitted").
cat >"$work/containers.conf" <<'EOF'
[containers]
default_ulimits = []
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
EOF
printf '{ "default": [ { "type": "insecureAcceptAnything" } ] }\n' >"$work/policy.json"
export CONTAINERS_CONF="$work/containers.conf"
export WARDEN_SIGNATURE_POLICY="$work/policy.json"

# ---------------------------------------------------------------- clean-up
names=()
smoke_db="warden_smoke_$$"
db_created=0
cleanup() {
    local rc=$?
    if [ -n "$failed" ] || [ "$rc" != 0 ]; then
        [ -n "$failed" ] || failed="exit status $rc (see the output above)"
        for n in "${names[@]}"; do
            echo "---------------- podman logs $n (last 60 lines other than 'acquired partition')" >&2
            podman logs "$n" 2>&1 | grep -v 'ownership: acquired partition' | tail -60 >&2 || true
        done
        podman ps -a --filter "name=warden-smoke-$$" >&2 || true
    fi
    for n in "${names[@]}"; do podman rm -f -t 0 "$n" >/dev/null 2>&1 || true; done
    if [ "$db_created" = 1 ]; then
        "$PSQL" "$DATABASE_URL" -qAtX -c "DROP DATABASE IF EXISTS $smoke_db WITH (FORCE)" >/dev/null 2>&1 || true
    fi
    if [ "$keep_image" = 0 ]; then podman rmi -f "$image" >/dev/null 2>&1 || true; fi
    rm -rf "$work"
    echo
    echo "================ Warden image smoke test: timings"
    for t in "${timings[@]}"; do echo "  $t"; done
    printf '  %-50s %ss\n' "total" "$(secs "$t_start" "$(now)")"
    if [ -z "$failed" ]; then
        echo "================ PASS"
    else
        echo "================ FAIL: $failed"
        [ "$rc" != 0 ] || rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'failed="interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------- image and CLI
# One cargo run for the node and the CLI (one feature resolution, one lock wait), then
# build.sh packs the node binary.
t=$(now)
targets=(-p warden-cli --bin warden)
[ "$use_image" = 1 ] || targets=(-p warden-examples --bin warden-node "${targets[@]}")
# shellcheck disable=SC2086 # WARDEN_CARGO may be a command with arguments
${WARDEN_CARGO:-cargo} build --locked --profile "$cargo_profile" "${targets[@]}" >"$work/cargo.log" 2>&1 \
    || { tail -40 "$work/cargo.log" >&2; fail "cargo build ${targets[*]} failed"; }
node_bin="${CARGO_TARGET_DIR:-$repo/target}/$profile/warden-node"
cli="${CARGO_TARGET_DIR:-$repo/target}/$profile/warden"
what="node + CLI"
[ "$use_image" = 0 ] || what="CLI"
timing "cargo build --profile $cargo_profile ($what)" "$(secs "$t" "$(now)")s"
if [ "$use_image" = 1 ]; then
    podman image exists "$image" || fail "no image $image"
    log "testing the existing image $image"
else
    t=$(now)
    "$repo/deploy/image/build.sh" --binary "$node_bin" --image "$image" >"$work/build.log" 2>&1 \
        || { tail -40 "$work/build.log" >&2; fail "deploy/image/build.sh failed"; }
    grep '^build.sh:' "$work/build.log" >&2 || true
    timing "image build (build.sh: rootfs + buildah commit)" "$(secs "$t" "$(now)")s"
fi
timing "image size" "$(podman image inspect --format '{{.Size}}' "$image" | awk '{ printf "%.1f MB", $1 / 1e6 }')"

# The image must match the Dockerfile's runtime stage (the one users build).
podman image inspect --format '{{json .Config}}' "$image" >"$work/config.json"
python3 - "$repo/deploy/image/Dockerfile" "$work/config.json" <<'EOF' \
    || fail "the image config differs from deploy/image/Dockerfile's runtime stage"
import json, re, shlex, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
config = json.load(open(sys.argv[2]))
stage = text.split("\nFROM ")[-1]  # the last stage: the runtime image
want = {"env": set(), "ports": set(), "user": None, "stop": None, "entrypoint": None}
for line in stage.splitlines():
    word, _, rest = line.strip().partition(" ")
    if word == "ENV":
        want["env"].update(shlex.split(rest))
    elif word == "EXPOSE":
        want["ports"].update(rest.split())
    elif word == "USER":
        want["user"] = rest.strip()
    elif word == "STOPSIGNAL":
        want["stop"] = rest.strip()
    elif word == "ENTRYPOINT":
        want["entrypoint"] = json.loads(rest)
# PATH is the builders' default for images FROM scratch, not set by the Dockerfile.
got = {"env": {e for e in config.get("Env") or [] if not e.startswith("PATH=")}, "ports": set(config.get("ExposedPorts") or {}),
       "user": config.get("User"), "stop": config.get("StopSignal"), "entrypoint": config.get("Entrypoint")}
bad = [f"{k}: Dockerfile {want[k]!r}, image {got[k]!r}" for k in want if want[k] != got[k]]
for b in bad:
    print("smoke: " + b, file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
log "image config matches the Dockerfile's runtime stage (env, ports, user, stop signal, entrypoint)"

# ---------------------------------------------------------------- database, ports, token
"$PSQL" "$DATABASE_URL" -v ON_ERROR_STOP=1 -qAtX -c "CREATE DATABASE $smoke_db" >/dev/null
db_created=1
db_url="$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$DATABASE_URL" "$smoke_db")"
sql() { "$PSQL" "$db_url" -v ON_ERROR_STOP=1 -qAtX -c "$1"; }

# Nine ports free for both TCP and UDP on 127.0.0.1 (gossip is UDP, admin and gRPC TCP).
read -r -a ports <<<"$(python3 - <<'EOF'
import socket
ports, held = [], []
while len(ports) < 9:
    t = socket.socket(); t.bind(("127.0.0.1", 0)); p = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", p))
    except OSError:
        t.close(); continue
    held += [t, u]; ports.append(p)
print(*ports)
EOF
)"
gossip=("" "${ports[0]}" "${ports[1]}" "${ports[2]}")
admin=("" "${ports[3]}" "${ports[4]}" "${ports[5]}")
grpc=("" "${ports[6]}" "${ports[7]}" "${ports[8]}")
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/api-token"
chmod 0644 "$work/api-token"
warden() { "$cli" --endpoint "http://127.0.0.1:${grpc[$1]}" --token-file "$work/api-token" "${@:2}"; }

http_status() {
    python3 - "$1" <<'EOF'
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
}

# ---------------------------------------------------------------- the cluster
start_node() {
    local i=$1 name="warden-smoke-$$-n$1" seed
    # n1 seeds from itself; n2 and n3 name it `localhost` (resolved through the image's
    # /etc/nsswitch.conf and the /etc/hosts podman provides).
    if [ "$i" = 1 ]; then seed="127.0.0.1:${gossip[1]}"; else seed="localhost:${gossip[1]}"; fi
    names+=("$name")
    podman run -d --name "$name" \
        --network host --read-only --read-only-tmpfs=false --user 65532:65532 \
        --cap-drop all --security-opt no-new-privileges --stop-timeout 30 \
        -v "$work/api-token:/etc/warden/api-token:ro" \
        -e WARDEN_NODE_ID="n$i" \
        -e DATABASE_URL="$db_url" \
        -e WARDEN_GOSSIP_LISTEN="127.0.0.1:${gossip[$i]}" \
        -e WARDEN_GOSSIP_ADVERTISE="127.0.0.1:${gossip[$i]}" \
        -e WARDEN_SEEDS="$seed" \
        -e WARDEN_ADMIN_ADDR="127.0.0.1:${admin[$i]}" \
        -e WARDEN_GRPC_LISTEN="127.0.0.1:${grpc[$i]}" \
        -e WARDEN_API_TOKEN_FILE=/etc/warden/api-token \
        "$image" >/dev/null || fail "podman run $name failed"
}

# Wait until `$2...` succeeds, at most $1 seconds, polling every 0.2 s.
wait_for() {
    local timeout=$1 deadline
    shift
    deadline=$(awk "BEGIN { print $(date +%s) + $timeout }")
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# The ring as node $1 sees it: every partition held by one of the nodes in $2 (comma
# separated) and where the ring wants it, and the members active and live are exactly $2.
ring_is() {
    warden "$1" --json ring >"$work/ring.json" 2>/dev/null || return 1
    warden "$1" --json members >"$work/members.json" 2>/dev/null || return 1
    python3 - "$2" "$work/ring.json" "$work/members.json" <<'EOF'
import json, sys
want = set(sys.argv[1].split(","))
ring, members = json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
owner = lambda o: o.split("/")[0]
owners = {owner(p["actual_owner"]) for p in ring["assignment"]}
stable = all(p["handoff"] == "stable" for p in ring["assignment"])
active = {m["node_id"] for m in members["members"] if m["state"] == "active" and m["live"]}
ok = len(ring["assignment"]) == ring["partitions"] and owners == want and stable and active == want
sys.exit(0 if ok else 1)
EOF
}

all_ready() {
    local i
    for i in "$@"; do [ "$(http_status "http://127.0.0.1:${admin[$i]}/readyz")" = 200 ] || return 1; done
}

t=$(now)
for i in 1 2 3; do start_node "$i"; done
wait_for "$READY_TIMEOUT" all_ready 1 2 3 || fail "not every node's /readyz returned 200 within ${READY_TIMEOUT}s"
timing "podman run -> /readyz 200 on all 3" "$(secs "$t" "$(now)")s"
wait_for "$READY_TIMEOUT" ring_is 1 n1,n2,n3 || fail "the ring did not show 3 active members owning every partition within ${READY_TIMEOUT}s"
timing "podman run -> ring of 3, every partition stable" "$(secs "$t" "$(now)")s"
for i in 1 2 3; do
    [ "$(http_status "http://127.0.0.1:${admin[$i]}/healthz")" = 200 ] || fail "n$i /healthz"
    http_status "http://127.0.0.1:${admin[$i]}/metrics" | grep -qx 200 || fail "n$i /metrics"
done
warden 1 ring | sed 's/^/    /' >&2

# ---------------------------------------------------------------- jobs
# Wave w: $jobs charges over $accounts accounts; the first three through the gRPC API
# (the CLI) of the running nodes given, round robin, the rest through warden.enqueue in
# SQL, one autocommit transaction per job in one psql session. (Not one statement for
# all of them: a transaction that enqueues for many accounts escalates to an exclusive
# group lock while holding account locks, and deadlocks with the nodes' own follow-up
# enqueues of running chains; PostgreSQL then aborts one side.)
enqueue_wave() {
    local w=$1 base=$(( $1 * 1000000 )) i node
    shift
    local via=("$@")
    for i in 1 2 3; do
        node="${via[$(( (i - 1) % ${#via[@]} ))]}"
        warden "$node" jobs enqueue "smoke-$(( (base + i) % accounts ))" charge \
            --args "{\"purchase\": $((base + i)), \"amount_cents\": 500}" >/dev/null \
            || fail "warden jobs enqueue through n$node failed"
    done
    for ((i = base + 4; i <= base + jobs; i++)); do
        printf "SELECT warden.enqueue('smoke-%d', 'charge', '{\"purchase\": %d, \"amount_cents\": 500}');\n" \
            $((i % accounts)) "$i"
    done | "$PSQL" "$db_url" -v ON_ERROR_STOP=1 -qAtX >/dev/null || fail "wave $w: enqueueing through SQL failed"
    log "wave $w: enqueued $jobs charges over $accounts accounts"
}
unfinished() { sql "SELECT count(*) FROM warden.jobs WHERE state NOT IN ('completed', 'discarded', 'cancelled')"; }
all_finished() { [ "$(unfinished)" = 0 ]; }

t=$(now)
enqueue_wave 1 1 2 3
wait_for "$JOBS_TIMEOUT" all_finished || fail "$(unfinished) jobs still unfinished ${JOBS_TIMEOUT}s after wave 1"
timing "wave 1: $jobs charge->invoice->notify chains" "$(secs "$t" "$(now)")s"
ran_on="$(sql "SELECT string_agg(n || '=' || c, ' ' ORDER BY n) FROM (SELECT split_part(node, '/', 1) AS n, count(*) AS c FROM warden.attempts GROUP BY 1) s")"
log "attempts per node: $ran_on"
for i in 1 2 3; do [[ " $ran_on" == *" n$i="* ]] || fail "n$i ran no attempt in wave 1 ($ran_on)"; done

# ---------------------------------------------------------------- SIGTERM one container
# A second wave goes in just before, so n2 drains and hands off under load.
victim="warden-smoke-$$-n2"
enqueue_wave 2 1 2 3
t=$(now)
podman kill --signal TERM "$victim" >/dev/null
code="$(timeout "$STOP_TIMEOUT" podman wait "$victim")" || fail "n2 did not exit within ${STOP_TIMEOUT}s of SIGTERM"
timing "SIGTERM -> container exit (n2, under load)" "$(secs "$t" "$(now)")s"
exited_at="$(sql "SELECT now()")"
[ "$code" = 0 ] || fail "n2 exited with status $code after SIGTERM"
[ "$(podman inspect --format '{{.State.ExitCode}}' "$victim")" = 0 ] || fail "podman inspect: n2's exit code is not 0"
logs="$(podman logs "$victim" 2>&1)"
for line in "leaving: handing off every partition" "shutting down: draining and releasing" \
    "ownership: released" "node stopped cleanly"; do
    grep -q "$line" <<<"$logs" || fail "n2's log lacks \"$line\""
done
log "n2 exited 0; its log shows leaving -> handoff (ownership: released) -> node stopped cleanly"
wait_for "$RING_TIMEOUT" ring_is 1 n1,n3 || fail "n1 and n3 did not own every partition within ${RING_TIMEOUT}s of n2's exit"
timing "SIGTERM -> ring of 2, every partition stable" "$(secs "$t" "$(now)")s"
warden 3 ring | sed 's/^/    /' >&2

t=$(now)
enqueue_wave 3 1 3
wait_for "$JOBS_TIMEOUT" all_finished || fail "$(unfinished) jobs still unfinished ${JOBS_TIMEOUT}s after wave 3 (2 nodes)"
timing "waves 2 (rest) + 3 on the remaining 2 nodes" "$(secs "$t" "$(now)")s"
late="$(sql "SELECT count(*) FROM warden.attempts WHERE node LIKE 'n2/%' AND started_at >= '$exited_at'")"
[ "$late" = 0 ] || fail "$late attempts started on n2 after it exited"

# ---------------------------------------------------------------- what happened, checked
# Default billing faults (warden-node uses Faults::default()): 8% transient charge
# errors and 3% notify retries (retried), 0.5% declined cards (charge discarded, no
# follow-ups). Every chain ends; nothing else may be discarded.
read -r charges done_charges declined other_discards invoices invoice_jobs notifications notify_jobs <<<"$(sql "
SELECT (SELECT count(*) FROM warden.jobs WHERE kind = 'charge'),
       (SELECT count(*) FROM warden.jobs WHERE kind = 'charge' AND state = 'completed'),
       (SELECT count(*) FROM warden.jobs WHERE kind = 'charge' AND state = 'discarded' AND last_error LIKE 'card declined%'),
       (SELECT count(*) FROM warden.jobs WHERE state <> 'completed' AND NOT (kind = 'charge' AND last_error LIKE 'card declined%')),
       (SELECT count(*) FROM billing_invoices),
       (SELECT count(*) FROM warden.jobs WHERE kind = 'invoice' AND state = 'completed'),
       (SELECT count(*) FROM billing_notifications),
       (SELECT count(*) FROM warden.jobs WHERE kind = 'notify' AND state = 'completed')" | tr '|' ' ')"
log "charges $charges (completed $done_charges, declined $declined), invoices $invoices, notifications $notifications"
[ "$charges" = $((3 * jobs)) ] || fail "expected $((3 * jobs)) charges, found $charges"
[ "$other_discards" = 0 ] || fail "$other_discards jobs ended other than completed (or a declined charge)"
[ $((done_charges + declined)) = "$charges" ] || fail "charges: $done_charges completed + $declined declined != $charges"
for v in invoices invoice_jobs notifications notify_jobs; do
    [ "${!v}" = "$done_charges" ] || fail "$v = ${!v}, expected one per completed charge ($done_charges)"
done
gaps="$(sql "SELECT count(*) FROM (SELECT account FROM billing_invoices GROUP BY account HAVING max(number) <> count(*)) s")"
[ "$gaps" = 0 ] || fail "$gaps accounts have gaps or duplicates in their invoice numbers"
overlaps="$(sql "SELECT count(*) FROM (SELECT started_at, lag(finished_at) OVER (PARTITION BY account ORDER BY started_at, id) AS prev
                 FROM warden.attempts) s WHERE started_at < prev")"
[ "$overlaps" = 0 ] || fail "$overlaps attempts overlapped an earlier attempt of the same account"
log "every chain finished; invoice numbers gapless per account; no overlapping attempts per account"

for n in "${names[@]}"; do
    bad="$(podman logs "$n" 2>&1 | grep -E 'Read-only file system|os error 30|Permission denied|panicked' | head -3 || true)"
    [ -z "$bad" ] || fail "$n logged a write/permission error or a panic: $bad"
done
log "no write, permission or panic errors in any node's log (root filesystem read-only, no tmpfs)"
