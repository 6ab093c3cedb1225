"""Every file the package writes goes through here.

Whole files are written under a temporary name beside the target and then moved over it
(`epath.Path.replace`: `rename` refuses an existing destination on some backends), so a
reader, or a run killed mid-write, never sees a truncated file: it sees the old one or the
new one. Appended lines (`append_line`) are the one kind of write that can be torn by a
kill; their readers must tolerate a partial last line.

Keeping every write in one module is what lets the crash tests enumerate the write points.
Files written by libraries on their own (orbax checkpoints, TensorBoard event files, TFDS
ArrayRecord shards, PyAV's encoder) keep those libraries' own commit protocols.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from etils import epath

TEMPORARY_SUFFIX = ".tmp"


@contextlib.contextmanager
def replacing(path: epath.PathLike) -> Iterator[epath.Path]:
  """Yields a temporary path beside `path` to write; moved over `path` if the block succeeds.

  For writers that want a path of their own (np.savez, a figure's savefig, an encoder).
  """
  path = epath.Path(path)
  temporary = path.parent / f"{path.name}{TEMPORARY_SUFFIX}"
  try:
    yield temporary
  except BaseException:
    temporary.unlink(missing_ok=True)
    raise
  temporary.replace(path)


def write_bytes(path: epath.PathLike, data: bytes) -> epath.Path:
  """Writes `data` to `path` atomically (see the module docstring); returns `path`."""
  with replacing(path) as temporary:
    temporary.write_bytes(data)
  return epath.Path(path)


def write_text(path: epath.PathLike, text: str) -> epath.Path:
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: epath.PathLike, value: Any, *, indent: int | None = 2) -> epath.Path:
  """`value` as JSON with a final newline."""
  return write_text(path, json.dumps(value, indent=indent) + "\n")


def append_line(path: epath.PathLike, line: str) -> None:
  """Appends one line (a newline is added) and flushes it to the operating system."""
  with epath.Path(path).open("a") as f:
    f.write(line + "\n")
    f.flush()


def move(source: epath.PathLike, destination: epath.PathLike) -> epath.Path:
  """Moves a file or folder (a rename where the backend has one)."""
  return epath.Path(source).rename(destination)


def copy(source: epath.PathLike, destination: epath.PathLike) -> epath.Path:
  """Copies one file atomically (the destination appears complete or not at all)."""
  source = epath.Path(source)
  with replacing(destination) as temporary, source.open("rb") as reader:
    with temporary.open("wb") as writer:
      while block := reader.read(1 << 24):
        writer.write(block)
  return epath.Path(destination)


def probe_writable(folder: epath.PathLike, name: str) -> None:
  """Writes and removes a small file `name` in `folder`; raises OSError if it cannot."""
  probe = epath.Path(folder) / name
  probe.write_text("ok")
  probe.unlink()
