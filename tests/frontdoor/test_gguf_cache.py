"""The converted-GGUF cache is keyed by the file's content: copies share one entry, a changed file gets its own."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest

from hexgen.engine import checkpoint, gguf_convert


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
