"""Folders hexgen keeps state in (the model cache, node records): made on first use, with a clear error if not."""

from __future__ import annotations

from pathlib import Path

from hexgen.errors import UserError


def make_folder(path: Path, what: str, variable: str) -> Path:
    """`path` (and its parents) made if need be; one that cannot be made names the environment variable that moves
    it, e.g. make_folder(root / "gguf", "the model cache folder", "HEXGEN_CACHE_DIR")."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot make {what} {path} ({err.strerror}); set {variable} to a folder this user can "
                        "write") from None
    return path
