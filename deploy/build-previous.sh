#!/usr/bin/env bash
# Build the node binary of the previous release, for the rolling-upgrade test
# (tests/upgrade.rs). Prints the binary's path on stdout.
#
#   deploy/build-previous.sh [REV]     REV defaults to deploy/PREVIOUS_RELEASE
#
# The previous release is checked out in a git worktree under target/ and built with
# this checkout's target directory, so the registry crates compiled for this release
# are reused (only the workspace crates of the old release are compiled). The new
# release's own binaries are re-linked afterwards (their sources are touched), so the
# shared target directory never hands the tests an old binary by mistake.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
rev=${1:-$(tr -d '[:space:]' < deploy/PREVIOUS_RELEASE)}
out="$root/target/previous/warden-test-node-$rev"
if [[ -x "$out" ]]; then
    echo "$out"
    exit 0
fi
if ! git cat-file -e "$rev^{commit}" 2>/dev/null; then
    echo "build-previous: commit $rev is not in this clone (shallow?); fetch it first" >&2
    exit 3
fi
wt="$root/target/previous/src-$rev"
mkdir -p "$root/target/previous"
if [[ ! -d "$wt" ]]; then
    git worktree add --detach "$wt" "$rev" >&2
fi
(cd "$wt" && CARGO_TARGET_DIR="$root/target" cargo build --quiet -p warden-tests --bin warden-test-node >&2)
cp "$root/target/debug/warden-test-node" "$out"
git worktree remove --force "$wt" >&2 || true
# The shared target dir now holds the old binary under the new one's name: make the
# next build of this checkout link its own again.
touch tests/kit/bin/warden-test-node.rs runtime/host/src/host.rs
echo "$out"
