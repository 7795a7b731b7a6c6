"""Read slices of tensors from an HF safetensors checkpoint (single file or sharded with an index).

Only the requested rows/columns leave the memory-mapped file, so a rank holds just its shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hexgen.errors import ConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointReader:
    """Name -> file map of a checkpoint directory; opened files are cached."""

    def __init__(self, directory: str | Path, dtype: torch.dtype):
        self.directory = Path(directory)
        self.dtype = dtype
        self.file_of = _tensor_files(self.directory)
        self._open: dict[str, object] = {}

    def _handle(self, name: str):
        if name not in self.file_of:
            raise ConfigError(f"{self.directory}: checkpoint has no tensor {name!r}; is it a Llama-family model?")
        file = self.file_of[name]
        if file not in self._open:
            try:
                self._open[file] = safe_open(str(self.directory / file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise ConfigError(f"{self.directory / file}: not a readable safetensors file ({err})") from None
        return self._open[file]

    def has(self, name: str) -> bool:
        return name in self.file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def check_shape(self, name: str, expected: tuple[int, ...]) -> None:
        found = self.shape(name)
        if found != tuple(expected):
            raise ConfigError(
                f"{self.directory}: tensor {name} has shape {list(found)} but config.json implies {list(expected)}"
            )

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or rows [r0, r1) / columns [c0, c1) of it, converted to the engine dtype."""
        view = self._handle(name).get_slice(name)
        try:
            if rows is not None:
                tensor = view[rows[0] : rows[1]]
            elif cols is not None:
                tensor = view[:, cols[0] : cols[1]]
            else:
                tensor = view[:]
        except SafetensorError as err:
            raise ConfigError(f"{self.directory}: cannot read tensor {name} ({err}); is the file truncated?") from None
        return tensor.to(self.dtype)


def _tensor_files(directory: Path) -> dict[str, str]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ConfigError(f"{index}: not a valid safetensors index ({err})") from None
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise ConfigError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        return dict(weight_map)
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise ConfigError(
            f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; hexgen loads safetensors checkpoints or .gguf files"
        )
    try:
        with safe_open(str(single), framework="pt") as handle:
            names = list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{single}: not a readable safetensors file ({err})") from None
    return {name: SINGLE_FILE for name in names}
