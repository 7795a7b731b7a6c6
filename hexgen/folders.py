"""Folders hexgen keeps state in (the model cache, node records): made on first use, with a clear error if not; and
the text of the files a user names, with a clear error where there is none."""

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


def read_text(path: str | Path, what: str, error: type[UserError]) -> str:
    """The UTF-8 text of the file at `path`; `error` saying which `what` could not be read and why (missing,
    unreadable, a folder, or not text at all)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise error(f"cannot read {what} {path}: not a UTF-8 text file") from None
