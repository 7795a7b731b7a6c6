"""The converted-GGUF cache is keyed by the file's content: copies share one entry, a changed file gets its own."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest

from hexgen.engine import checkpoint, gguf_convert
from hexgen.errors import ConfigError, UserError


def write_small_gguf(path, scale: float) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", scale * np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def conversions(tmp_path, monkeypatch):
    """A cache in tmp_path and a stand-in converter that records which files it converted."""
    monkeypatch.setenv("HEXGEN_CACHE_DIR", str(tmp_path / "cache"))
    converted = []

    def fake_convert(gguf_path, out_dir, progress=True):
        converted.append(gguf_path)
        (out_dir / "model.safetensors").write_bytes(b"converted")

    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    return converted


def test_copies_of_one_file_share_one_cache_entry(tmp_path, conversions, capsys):
    original = tmp_path / "a" / "model.gguf"
    original.parent.mkdir()
    write_small_gguf(original, 1.0)
    clone = tmp_path / "clone" / "renamed.gguf"
    clone.parent.mkdir()
    shutil.copyfile(original, clone)
    os.utime(clone, ns=(1_000_000_000, 1_000_000_000))  # another clone, another file time
    expected = tmp_path / "cache" / "gguf" / hashlib.sha256(original.read_bytes()).hexdigest()[:16]

    assert checkpoint.converted_gguf_dir(original, progress=False) == expected
    assert checkpoint.converted_gguf_dir(clone, progress=False) == expected
    assert conversions == [original]
    assert f"into {expected} (set HEXGEN_CACHE_DIR to move the cache)" in capsys.readouterr().err


def test_changed_content_gets_its_own_entry(tmp_path, conversions):
    path = tmp_path / "model.gguf"
    write_small_gguf(path, 1.0)
    first = checkpoint.converted_gguf_dir(path, progress=False)
    write_small_gguf(path, 2.0)
    second = checkpoint.converted_gguf_dir(path, progress=False)
    assert second.name == hashlib.sha256(path.read_bytes()).hexdigest()[:16] != first.name
    assert conversions == [path, path]


def test_an_unchanged_file_is_not_hashed_again(tmp_path, conversions):
    """The index trusts (path, size, mtime): content swapped under the same size and time keeps the old key."""
    path = tmp_path / "model.gguf"
    write_small_gguf(path, 1.0)
    first_hash = hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoint.gguf_sha256(path) == first_hash
    stat = path.stat()
    write_small_gguf(path, 3.0)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert checkpoint.gguf_sha256(path) == first_hash  # read from the index, not from the file


def test_a_cache_that_cannot_be_made_is_named(tmp_path, conversions, monkeypatch):
    """HEXGEN_CACHE_DIR under a file (or /proc) crashed `hexgen generate` with a FileNotFoundError traceback."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("HEXGEN_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    path = tmp_path / "model.gguf"
    write_small_gguf(path, 1.0)
    with pytest.raises(UserError, match=r"cannot make the model cache folder .*a-file/cache/gguf \(Not a directory\);"
                                          r" set HEXGEN_CACHE_DIR to a folder this user can write"):
        checkpoint.converted_gguf_dir(path, progress=False)


def test_a_conversion_that_fails_to_write_leaves_nothing_half_written(tmp_path, conversions, monkeypatch):
    """A full disk mid-conversion: one line saying where and what to do, and no staging folder left behind."""

    def disk_full(gguf_path, out_dir, progress=True):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_convert, "convert_gguf", disk_full)
    path = tmp_path / "model.gguf"
    write_small_gguf(path, 1.0)
    with pytest.raises(ConfigError, match=r"converting model.gguf into .*/gguf failed \(No space left on device\)"):
        checkpoint.converted_gguf_dir(path, progress=False)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == ["index.json"]
