"""Sub-commands of the `hexgen` CLI. Each module has `register(subparsers)` and imports heavy
libraries (torch) only inside its run function, so `hexgen plan` starts without torch."""

from hexgen.commands import bench, cluster_cmd, generate, node, plan_cmd, profile_cmd, serve, simulate_cmd

COMMANDS = [generate, serve, bench, plan_cmd, simulate_cmd, profile_cmd, node, cluster_cmd]
