"""files.py: whole files are replaced atomically, also over an existing file."""

import json

import pytest

from cmvt_jax import files


def test_write_replaces_an_existing_file(tmp_path):
  path = tmp_path / "a.json"
  files.write_json(path, {"run": 1})
  files.write_json(path, {"run": 2})  # a second run of the same command
  assert json.loads(path.read_text()) == {"run": 2}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "figure.png"
  files.write_bytes(path, b"old")
  with pytest.raises(RuntimeError, match="drawing failed"):
    with files.replacing(path) as temporary:
      temporary.write_bytes(b"half a fig")
      raise RuntimeError("drawing failed")
  assert path.read_bytes() == b"old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]


def test_append_line_and_copy(tmp_path):
  path = tmp_path / "metrics.jsonl"
  files.append_line(path, '{"step": 1}')
  files.append_line(path, '{"step": 2}')
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
  copied = files.copy(path, tmp_path / "copy.jsonl")
  assert copied.read_text() == path.read_text()
  moved = files.move(copied, tmp_path / "moved.jsonl")
  assert moved.exists() and not copied.exists()
