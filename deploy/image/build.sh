#!/usr/bin/env bash
# Build the Warden node image with buildah, pulling nothing: `buildah from scratch`,
# then the runtime layout of deploy/image/rootfs.sh (the binary, exactly the shared
# libraries ldd lists and the loader, /etc/passwd + /etc/group with uid 65532
# `nonroot`, /tmp), user 65532, entrypoint, env defaults, ports, STOPSIGNAL and OCI
# labels: the same image as deploy/image/Dockerfile, without a registry or a daemon.
#
#   deploy/image/build.sh [--profile release|debug] [--image NAME] [--binary PATH]
#                         [--package CRATE --bin NAME]
#
#   --profile   cargo profile to build (default: release; the CI smoke uses debug)
#   --image     image name (default: localhost/warden-node:dev)
#   --binary    use this already-built binary instead of running cargo (--profile,
#               --package and --bin are then ignored)
#   --package / --bin   the node crate and binary to build (default: warden-examples /
#               warden-node); installed as /usr/local/bin/warden-node either way
#
# Environment: WARDEN_CARGO (default `cargo`; e.g. "flock /tmp/lock cargo"),
# CARGO_TARGET_DIR (where cargo puts the binary), WARDEN_SIGNATURE_POLICY (a
# containers policy.json for `buildah commit`, if /etc/containers/policy.json is not
# there). Needs buildah; works as root or rootless (files in the image are root-owned).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"

profile=release
image=localhost/warden-node:dev
binary=
package=warden-examples
bin=warden-node
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
        --image) image="${2:?--image needs a value}"; shift 2 ;;
        --binary) binary="${2:?--binary needs a value}"; shift 2 ;;
        --package) package="${2:?--package needs a value}"; shift 2 ;;
        --bin) bin="${2:?--bin needs a value}"; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
command -v buildah >/dev/null || { echo "build.sh: buildah not found (apt-get install buildah)" >&2; exit 1; }

t0=$(date +%s.%N)
t1=$t0
if [ -z "$binary" ]; then
    case "$profile" in
        release) dir=release ;;
        debug | dev) profile=dev; dir=debug ;;
        *) dir="$profile" ;;
    esac
    # shellcheck disable=SC2086 # WARDEN_CARGO may be a command with arguments
    (cd "$repo" && ${WARDEN_CARGO:-cargo} build --locked --profile "$profile" -p "$package" --bin "$bin")
    binary="${CARGO_TARGET_DIR:-$repo/target}/$dir/$bin"
    t1=$(date +%s.%N)
fi
[ -x "$binary" ] || { echo "build.sh: no executable at $binary" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/warden-image.XXXXXX")"
ctr=
cleanup() {
    if [ -n "$ctr" ]; then buildah rm "$ctr" >/dev/null 2>&1 || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
"$repo/deploy/image/rootfs.sh" "$binary" "$work/rootfs"

version="$("$binary" --version 2>/dev/null | awk 'NR == 1 { print $NF }')" || true
revision="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git -C "$repo" status --porcelain 2>/dev/null)" ]; then revision="$revision-dirty"; fi
source_url="$(git -C "$repo" remote get-url origin 2>/dev/null || true)"

ctr="$(buildah from scratch)"
# Contents of rootfs/ into /, modes kept, every file owned by root.
buildah copy --quiet "$ctr" "$work/rootfs/" / >/dev/null
# Keep in step with the runtime stage of deploy/image/Dockerfile (smoke.sh compares them).
# PATH: the default Docker and Buildah give every image built FROM scratch.
buildah config \
    --user 65532:65532 \
    --workingdir / \
    --entrypoint '["/usr/local/bin/warden-node"]' \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env WARDEN_ADMIN_ADDR=0.0.0.0:9090 \
    --env NO_COLOR=1 \
    --port 9090/tcp --port 7070/tcp --port 7946/udp \
    --stop-signal SIGTERM \
    --label org.opencontainers.image.title="warden-node" \
    --label org.opencontainers.image.description="A Warden node ($package/$bin): account-scoped background jobs on a cluster sharing one PostgreSQL" \
    --label org.opencontainers.image.version="${version:-unknown}" \
    --label org.opencontainers.image.revision="$revision" \
    --label org.opencontainers.image.created="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --label org.opencontainers.image.licenses="Apache-2.0" \
    ${source_url:+--label org.opencontainers.image.source="$source_url"} \
    "$ctr"
policy=()
if [ -n "${WARDEN_SIGNATURE_POLICY:-}" ]; then policy=(--signature-policy "$WARDEN_SIGNATURE_POLICY"); fi
buildah commit --quiet --rm "${policy[@]}" "$ctr" "$image" >/dev/null
ctr=
t2=$(date +%s.%N)

secs() { awk "BEGIN { printf \"%.1f\", $2 - $1 }"; }
rootfs_mib=$(du -sm "$work/rootfs" | awk '{ print $1 }')
bin_mib=$(($(stat -c %s "$work/rootfs/usr/local/bin/warden-node") / 1024 / 1024))
echo "build.sh: built $image from $binary"
echo "build.sh: image size $(buildah images --format '{{.Size}}' "$image" | head -1)" \
    "(rootfs ${rootfs_mib} MiB, of which the binary ${bin_mib} MiB with debug info stripped)"
if [ "$t1" != "$t0" ]; then echo "build.sh: cargo $(secs "$t0" "$t1")s"; fi
echo "build.sh: image $(secs "$t1" "$t2")s"
