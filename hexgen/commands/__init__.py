"""Sub-commands of the `hexgen` CLI. Each module has `register(subparsers)` and imports heavy
libraries (torch) only inside its run function, so `hexgen plan` starts without torch."""

from hexgen.commands import bench, generate, plan_cmd, serve, simulate_cmd
from hexgen.commands import node  # noqa: I001 - the multi-machine commands

COMMANDS = [generate, serve, bench, plan_cmd, simulate_cmd, node]
