"""`hexgen cluster probe`: a Ray cluster's machines and links as the cluster YAML that `hexgen plan` reads."""

from __future__ import annotations

import argparse
import sys

from hexgen.commands.arg_types import output_file

MAX_BULK_MIB = 4096  # the probe's transfer is held in memory on both machines of a pair


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="probe the machines of a Ray cluster into a cluster YAML",
                       description=__doc__)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    probe = actions.add_parser("probe", help="find machines, GPUs and links; write the cluster YAML")
    probe.add_argument("--ray", required=True, metavar="HEAD_HOST:PORT", help="the cluster's head address")
    probe.add_argument("-o", "--output", required=True, type=output_file, help="cluster YAML to write")
    probe.add_argument("--bulk-mib", type=int, default=16,
                       help=f"MiB sent between each pair to measure bandwidth (1..{MAX_BULK_MIB})")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hexgen.errors import UserError
    from hexgen.raycluster.env import connect

    if not 1 <= args.bulk_mib <= MAX_BULK_MIB:
        raise UserError(f"--bulk-mib must be in 1..{MAX_BULK_MIB} (each machine holds it in memory), "
                        f"got {args.bulk_mib}")
    connect(args.ray)
    import ray

    from hexgen.cluster import parse_cluster
    from hexgen.raycluster.cluster_file import cluster_yaml
    from hexgen.raycluster.probe import probe

    try:
        reports, links = probe(args.bulk_mib * 2**20)
    finally:
        ray.shutdown()
    text = cluster_yaml(reports, links)
    parse_cluster(text, args.output)  # what we write, `hexgen plan` must read
    with open(args.output, "w") as out:
        out.write(text)
    for r in reports:
        dev = r.devices
        kind = f"{dev['gpu_count']} x {dev['gpu_name']}" if dev["gpu_count"] else f"{r.slots} CPU slots"
        print(f"{r.name} ({r.node_ip}): {kind}", file=sys.stderr)
    for (a, b), (lat, bw) in links.items():
        print(f"{a} <-> {b}: {lat:.3f} ms, {bw:.2f} Gbit/s", file=sys.stderr)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
