#!/usr/bin/env bash
# A 3-node Warden demo cluster on 127.0.0.1, for trying the gRPC API and the CLI.
#
#   ./deploy/demo-cluster.sh            # builds, starts PostgreSQL if DATABASE_URL is unset,
#                                       # starts nodes n1..n3 and a trickle of billing jobs
#
# Then, in another terminal (binaries in target/release):
#   ./target/release/warden ring        # partitions and load per node (n1's API: 127.0.0.1:7070)
#   ./target/release/warden watch       # live ownership events
#   kill -TERM $(cat /tmp/warden-demo-cluster/n2.pid)   # graceful leave: watch partitions move
#   kill -KILL $(cat /tmp/warden-demo-cluster/n3.pid)   # crash: moves after the lease TTL
#   ./target/release/warden jobs list --state retryable
#   ./target/release/warden jobs enqueue tenant-1 charge --args '{"purchase": 1, "amount_cents": 500}'
# Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${DATABASE_URL:-}" ]; then
    exec ./deploy/pg.sh run "$0" "$@"
fi
cargo build --release -p warden-examples -p warden-cli --bins
DIR=/tmp/warden-demo-cluster
mkdir -p "$DIR"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for i in 1 2 3; do
    RUST_LOG="${RUST_LOG:-info,sqlx=warn}" ./target/release/warden-node \
        --node-id "n$i" --gossip-listen "127.0.0.1:760$i" --seeds 127.0.0.1:7601 \
        --grpc-listen "127.0.0.1:707$((i - 1))" --admin-addr "127.0.0.1:909$i" \
        >"$DIR/n$i.out" 2>"$DIR/n$i.log" &
    pids+=($!)
    echo $! >"$DIR/n$i.pid"
done
sleep 2
echo "demo cluster: n1 gRPC 127.0.0.1:7070, n2 :7071, n3 :7072; logs in $DIR/n*.log"
echo "try: ./target/release/warden ring    ./target/release/warden watch    (Ctrl-C here stops all)"
# A trickle of billing work across 50 tenants so there is something to watch.
n=0
while true; do
    for t in $(seq 1 10); do
        n=$((n + 1))
        ./target/release/warden jobs enqueue "tenant-$(( (n % 50) + 1 ))" charge \
            --args "{\"purchase\": $n, \"amount_cents\": $((100 + n % 900))}" >/dev/null 2>&1 || true
    done
    sleep 1
done
