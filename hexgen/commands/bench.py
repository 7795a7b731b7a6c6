"""`hexgen bench WHAT`: the benchmark families, one module each."""

from __future__ import annotations

import argparse

from hexgen.commands import bench_engine, bench_serve

BENCHMARKS = [bench_engine, bench_serve]


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True, metavar="WHAT")
    for module in BENCHMARKS:
        module.register(bench)
