#!/bin/sh
# scripts/soak.py against `hexgen serve --ray` over three machines simulated on this one: Ray nodes a (2 slots),
# b (1) and c (3) joined with `hexgen node` on 127.0.0.1-3, probed into a cluster file, all inside a network
# namespace whose only interface is loopback (Ray probes outside addresses otherwise); needs root for `unshare -n`.
#
#   sudo sh scripts/soak_ray.sh --requests 200 --kill-rank-after 30 --kill-machine b \
#       -- --plan examples/plans/ray-three-machines.json --max-batch 32 --memory-gb 0.66 --replan
#
# Arguments: scripts/soak.py's, then after `--` the `hexgen serve` flags (`--ray` and, with `--replan`, `--cluster`
# are added). Everything Ray writes stays under a temporary folder, removed at the end with every Ray process.
set -u
if [ "${HEXGEN_SOAK_ISOLATED:-}" != 1 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null 2>&1 || ! unshare -n true 2>/dev/null; then
        echo "soak_ray.sh: needs root, ip and unshare to run Ray in a loopback-only network namespace" >&2
        exit 2
    fi
    exec env HEXGEN_SOAK_ISOLATED=1 unshare -n sh "$0" "$@"
fi
ip link set lo up
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON="$REPO/.venv/bin/python"
ROOT=$(mktemp -d /tmp/hxsoak.XXXX)  # short: Ray's socket paths must stay under 108 bytes
mkdir -p "$ROOT/home" "$ROOT/state" "$ROOT/tmp"
export HOME="$ROOT/home" HEXGEN_STATE_DIR="$ROOT/state" RAY_TMPDIR="$ROOT/tmp" GLOO_SOCKET_IFNAME=lo
hexgen() { "$PYTHON" -m hexgen.cli "$@"; }
soak_args=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do soak_args="$soak_args '$1'"; shift; done
[ $# -gt 0 ] && shift  # the `--`
rc=1
if hexgen node start --head --port 6379 --node-ip-address 127.0.0.1 --machine a --slots 2 &&
   hexgen node join 127.0.0.1:6379 --machine b --slots 1 --node-ip-address 127.0.0.2 &&
   hexgen node join 127.0.0.1:6379 --machine c --slots 3 --node-ip-address 127.0.0.3 &&
   hexgen cluster probe --ray 127.0.0.1:6379 -o "$ROOT/cluster.yaml" --bulk-mib 2; then
    cd "$REPO" || exit 1
    cluster=""
    case " $* " in *" --replan "*) cluster="--cluster '$ROOT/cluster.yaml'" ;; esac  # what --replan plans on
    eval "set -- $soak_args -- --ray 127.0.0.1:6379 $cluster \"\$@\""
    "$PYTHON" scripts/soak.py "$@"
    rc=$?
fi
hexgen node stop
rm -rf "$ROOT"
exit $rc
