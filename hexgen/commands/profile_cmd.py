"""`hexgen profile`: measure this machine as the engine uses it and write a profile file for plan / simulate."""

from __future__ import annotations

import argparse

from hexgen.commands.arg_types import model_name, output_file


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measure this machine's device for the planner and simulator",
                              description=__doc__)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="what to measure: the GPU if there is one (auto), or the CPU")
    p.add_argument("--device-type", help="GPU type name the figures stand for in cluster files "
                                         "(default: CPU-worker on CPU, the GPU's table name on CUDA)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="element type; auto: what `hexgen serve --dtype auto` runs on this device (bfloat16 on GPUs "
                   "from Ampere on and on CPUs with bf16 arithmetic, else float32)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads to measure with (0: torch's default, as a one-rank replica runs; ranks of "
                        "multi-rank replicas get the machine's cores over the replicas' largest TP groups)")
    p.add_argument("--model", type=model_name,
                   help="also fit the per-layer and per-sequence overheads to this model's decode steps "
                   "(embedded name, HF directory or .gguf), so the profile matches what it serves")
    p.add_argument("-o", "--output", required=True, type=output_file, help="profile file to write (.yaml or .json)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    import yaml

    from hexgen.commands.engine_args import resolve_dtype
    from hexgen.engine.devices import cuda_device_count, cuda_device_name, require_cuda
    from hexgen.engine.profiler import measure_profile
    from hexgen.errors import UserError
    from hexgen.machine import cpu_description, usable_cores
    from hexgen.profile import profile_from_dict

    if args.device == "cuda":
        require_cuda()
    if args.device_type is not None and not args.device_type.strip():
        raise UserError("--device-type is empty: give the GPU type name cluster files use, e.g. H200")
    cores = usable_cores()
    if not 0 <= args.threads <= cores:
        raise UserError(f"--threads must be in 0..{cores} (this machine's cores; 0: torch's default), "
                        f"got {args.threads}")
    if Path(args.output).suffix not in (".yaml", ".yml", ".json"):
        raise UserError(f"--output {args.output}: a profile is written as .yaml (or .yml) or .json")
    if args.model is not None:  # refused before the minute of measuring, not after it (a GGUF converts once here)
        from hexgen.engine.checkpoint import resolve_model

        resolve_model(args.model)
    device = args.device if args.device != "auto" else ("cuda" if cuda_device_count() else "cpu")
    describe = cpu_description()
    if device == "cuda":
        describe = f"{cuda_device_name()}; host {describe}"
    device_type = args.device_type or ("CPU-worker" if device == "cpu" else _gpu_table_name())
    dtype = resolve_dtype(args.dtype, device, ray=False)  # the profile is of what serve runs by default
    load = os.getloadavg()[0]
    if load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores; other work will make every figure low")
    print(f"measuring {describe} as {device_type} ({dtype}); this takes about a minute")
    figures = measure_profile(device_type, dtype, device, describe, args.threads, args.model)
    figures["load_average_1m"] = round(os.getloadavg()[0], 2)
    profile_from_dict(figures, "measured profile")  # what we write must load
    out = Path(args.output)
    text = json.dumps(figures, indent=1) if out.suffix == ".json" else yaml.safe_dump(figures, sort_keys=False)
    out.write_text(text if text.endswith("\n") else text + "\n")
    for key in ("matmul_tflops", "memory_bandwidth_gbs", "step_overhead_ms", "layer_overhead_ms", "seq_overhead_ms",
                "allreduce", "transfer"):
        print(f"  {key}: {figures.get(key, 'not measured (one GPU: no link to time)')}")
    print(f"wrote {out}")
    return 0


def _gpu_table_name() -> str:
    """The built-in table's name for this GPU, when its device name contains one (H200, H100, A100, ...)."""
    from hexgen.cluster import builtin_gpu_types
    from hexgen.engine.devices import cuda_device_name
    from hexgen.errors import UserError

    name = cuda_device_name().replace(" ", "").upper()
    for table_name in sorted(builtin_gpu_types(), key=len, reverse=True):
        if table_name.split("-")[0].upper() in name:
            return table_name
    raise UserError(f"GPU {cuda_device_name()!r} is not in the built-in table; name it with --device-type")
