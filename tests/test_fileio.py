"""Atomic writes: outputs appear whole or not at all."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cocomix_core.plumbing.files import (
    atomic_path,
    is_partial,
    sha256_file,
    sha256_json,
    write_json_atomic,
)


def test_failed_write_leaves_the_previous_file_and_no_leftovers(tmp_path: Path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temp:
            temp.write_text("half")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_folder_is_replaced_whole(tmp_path: Path):
    target = tmp_path / "folder"
    for version in ("old", "new"):
        with atomic_path(target) as temp:
            temp.mkdir()
            (temp / "a.txt").write_text(version)
            assert is_partial(temp) and not is_partial(target)
    assert (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_digests_depend_on_content_only(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"x" * 10)
    assert sha256_file(a) == sha256_file(b) == hashlib.sha256(b"x" * 10).hexdigest()
    assert sha256_file(a, chunk_bytes=3) == sha256_file(a)  # chunked reading changes nothing
    assert sha256_json({"x": 1, "y": 2}) == sha256_json({"y": 2, "x": 1})
    assert sha256_json({"x": 1}) != sha256_json({"x": 2})
