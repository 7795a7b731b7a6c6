"""`hexgen node start --head | join | stop`: this machine's Ray node, named by the machine name plans use."""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket

from hexgen.errors import UserError

DEFAULT_PORT = 6379


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="start, join or stop this machine's node of a Ray cluster",
                       description=__doc__)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = actions.add_parser("start", help="start the head node of a new cluster on this machine")
    start.add_argument("--head", action="store_true", required=True,
                       help="start a head node (other machines use `join`)")
    start.add_argument("--port", type=int, default=DEFAULT_PORT, help="the head's port (Ray's GCS)")
    join = actions.add_parser("join", help="join this machine to a cluster")
    join.add_argument("address", metavar="HEAD_HOST:PORT", help="the address `node start --head` printed")
    for q in (start, join):
        q.add_argument("--machine", default=socket.gethostname(), help="the machine name plans use")
        q.add_argument("--slots", type=int, help="GPUs for hexgen ranks (default: the GPUs torch sees, "
                                                 "else CPU worker slots = cores)")
        q.add_argument("--node-ip-address", default="",
                       help="the address other machines reach this one at (default: Ray's choice)")
    stop = actions.add_parser("stop", help="stop the Ray processes this machine's node(s) started")
    stop.add_argument("--machine", help="only the node of this machine name (default: every node started here)")
    p.set_defaults(run=run)


def default_slots() -> int:
    from hexgen.engine.devices import cuda_device_count
    from hexgen.machine import usable_cores

    return cuda_device_count() or usable_cores()


def run(args: argparse.Namespace) -> int:
    from hexgen.raycluster.env import check_head
    from hexgen.raycluster.node import start_node, stop_nodes

    if args.action == "stop":
        stopped = stop_nodes(args.machine)
        print(f"hexgen node: stopped {', '.join(stopped)}" if stopped else "hexgen node: no node started here")
        return 0
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", args.machine or ""):  # it names files and Ray resources
        raise UserError(f"--machine {args.machine!r}: a name of letters, digits, '_', '.' and '-', not starting "
                        "with '.' or '-'")
    if args.node_ip_address:
        try:
            ipaddress.ip_address(args.node_ip_address)
        except ValueError:
            raise UserError(f"--node-ip-address {args.node_ip_address!r}: expected this machine's IP address, e.g. "
                            "10.0.0.6") from None
    slots = default_slots() if args.slots is None else args.slots
    if slots < 0:
        raise UserError(f"--slots must be >= 0, got {slots}")
    if args.action == "start":
        if not 0 < args.port < 65536:
            raise UserError(f"--port must be in 1..65535, got {args.port}")
        record, token = start_node(args.machine, slots, args.node_ip_address, None, args.port)
        print(f"hexgen node: head of machine {record.machine!r} ({slots} slots) at {record.head_address}")
        print(f"join other machines with:\n  RAY_AUTH_TOKEN={token} hexgen node join {record.head_address} "
              "--machine NAME")
        print(f"then, here: hexgen cluster probe --ray {record.head_address} -o cluster.yaml; hexgen plan ...; "
              f"hexgen serve --ray {record.head_address} --plan plan.json (the token is in ~/.ray/auth_token)")
        return 0
    check_head(args.address, "the head's address")  # a positional argument: no flag to name
    record, _ = start_node(args.machine, slots, args.node_ip_address, args.address, 0)
    print(f"hexgen node: machine {record.machine!r} ({slots} slots) joined {record.head_address}")
    return 0
