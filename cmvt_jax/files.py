"""Every file the package writes goes through here: atomic replace, appends, moves, removals.

Whole files are written under a temporary name beside the target (`NAME.cmvt-tmp`), synced
to disk, and moved over the target (`os.replace`), so a reader, or a run killed mid-write,
sees the old file or the new one, never a truncated one. Appended lines (`append_line`) are
the one kind of write a kill can tear; their readers drop a partial last line.

Object stores (`gs://`, any non-local epath) have no rename and no fsync, but an upload
appears whole or not at all: the writer writes a local temporary and uploads it in one go,
abandoning the upload if anything fails, so an object is never left half written. They have
no append either (gcsfs silently turns 'a' into 'w'): `append_line` there rewrites the
object with the new line.

A full disk raises `DiskFullError`, naming the path.

Crash tests. Every write is a *write point* of a named kind (`kind=`: "config.json",
"metrics-append", "export-part", ...). Two environment variables make a process report or
die at them (tests/reliability/crash_harness.py uses them; nothing else should):
  CMVT_WRITE_LOG=FILE        each write point appends `pid, kind, ordinal, phases, path`
                             (tab-separated) to FILE;
  CMVT_CRASH_AT=KIND:N:PHASE the N-th write point of KIND in a process (1-based) kills the
                             program with SIGKILL at PHASE: "before" (nothing written yet),
                             "middle" (the temporary or the line half written) or "after"
                             (the write complete). Moves and removals of files have no
                             middle; writes done by a library on its own (orbax, TFDS,
                             tensorboardX: `LibraryWrite`) are one opaque point, killed
                             just before or just after.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

from etils import epath

TEMPORARY_SUFFIX = ".cmvt-tmp"
WRITE_LOG_ENV = "CMVT_WRITE_LOG"
CRASH_ENV = "CMVT_CRASH_AT"
BEFORE, MIDDLE, AFTER = "before", "middle", "after"
# The phases a crash test can stop each kind of write at.
WHOLE_FILE = (BEFORE, MIDDLE, AFTER)
ATOMIC = (BEFORE, AFTER)

_COPY_BLOCK = 1 << 24
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
  """A write failed because the device (or the quota) is full."""

  def __init__(self, path: epath.PathLike, error: OSError):
    super().__init__(error.errno, os.strerror(error.errno or errno.ENOSPC))
    self.path = os.fspath(path)

  def __str__(self) -> str:
    return (
      f"No space left on the device of {self.path} ({self.strerror}). Free some space there "
      "and run the same command again: a run resumes from its last complete checkpoint."
    )


@contextlib.contextmanager
def naming_full_disk(path: epath.PathLike) -> Iterator[None]:
  """Turns an out-of-space error raised inside into a DiskFullError that names `path`."""
  try:
    yield
  except DiskFullError:
    raise
  except Exception as error:
    cause = full_disk_cause(error)
    if cause is None:
      raise
    raise DiskFullError(path, cause) from error


def mentions_full_disk(text: str) -> bool:
  """Whether a message tells of a full device (as libraries' logs and reprs do)."""
  return any(os.strerror(code) in text for code in _FULL_DISK)


def full_disk_cause(error: BaseException | None) -> OSError | None:
  """The out-of-space OSError that `error` is or was raised from, if any. Libraries wrap
  it in their own types; TensorStore (orbax's array writer) raises a ValueError whose text
  carries the OS error."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in _FULL_DISK:
      return error
    if any(f"[os_error_code='{code}']" in str(error) for code in _FULL_DISK):
      return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    error = error.__cause__ or error.__context__
  return None


# ----------------------------------------------------------------------------- write points

_ordinals = collections.Counter()


class _WritePoint:
  """One write of `kind` to `path`; `reach(phase)` is where a crash test may kill it."""

  def __init__(self, kind: str, path: epath.PathLike, phases: tuple[str, ...]):
    _ordinals[kind] += 1
    self.kind, self.ordinal, self.path = kind, _ordinals[kind], os.fspath(path)
    log = os.environ.get(WRITE_LOG_ENV)
    if log:
      with epath.Path(log).open("a") as f:
        f.write(f"{os.getpid()}\t{kind}\t{self.ordinal}\t{','.join(phases)}\t{self.path}\n")

  def reach(self, phase: str, tear: Callable[[], None] | None = None) -> None:
    """Kills the program here if CMVT_CRASH_AT names this point and `phase`; `tear` first
    leaves what a kill in the middle of the write would (half a temporary, half a line)."""
    if os.environ.get(CRASH_ENV) != f"{self.kind}:{self.ordinal}:{phase}":
      return
    if tear is not None:
      tear()
    sys.stderr.write(f"{CRASH_ENV}: killed at {self.kind} #{self.ordinal} {phase} ({self.path})\n")
    sys.stderr.flush()
    group = os.getpgrp()
    # The crash tests start the program as its own session: kill all of it (decoding and
    # data workers too), as a machine failure would. Otherwise only this process.
    if group == os.getsid(0):
      os.killpg(group, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class LibraryWrite:
  """A write that a library does on its own (orbax, TFDS, tensorboardX): one opaque point.

  Create it just before the library call and call `finished()` once the write is complete
  (or use it as a context manager around a synchronous call).
  """

  def __init__(self, kind: str, path: epath.PathLike):
    self._point = _WritePoint(kind, path, ATOMIC)
    self._point.reach(BEFORE)

  def finished(self) -> None:
    self._point.reach(AFTER)

  def __enter__(self) -> LibraryWrite:
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    if exc_type is None:
      self.finished()


# ----------------------------------------------------------------------------- whole files


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def _fsync(path: epath.PathLike, *, directory: bool = False) -> None:
  descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


def _tear(path: epath.Path) -> Callable[[], None]:
  """Cuts a file to half its length (what a kill mid-write leaves)."""

  def tear():
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

  return tear


@contextlib.contextmanager
def replacing(path: epath.PathLike, *, kind: str, durable: bool = True) -> Iterator[epath.Path]:
  """Yields a local temporary path to write; it replaces `path` if the block succeeds.

  For writers that want a path or a file of their own (np.savez, savefig, an encoder).
  `durable`: sync the file and its folder to disk before returning (False for scratch
  files that a crash may lose).
  """
  path = epath.Path(path)
  point = _WritePoint(kind, path, WHOLE_FILE)
  point.reach(BEFORE)
  with naming_full_disk(path):
    if _is_local(path):
      temporary = path.parent / f"{path.name}{TEMPORARY_SUFFIX}"
      try:
        yield temporary
        point.reach(MIDDLE, _tear(temporary))
        if durable:
          _fsync(temporary)
      except BaseException:
        temporary.unlink(missing_ok=True)
        raise
      temporary.replace(path)
      if durable:
        _fsync(path.parent, directory=True)
    else:
      with tempfile.TemporaryDirectory(prefix="cmvt_upload_") as scratch:
        temporary = epath.Path(scratch) / path.name
        yield temporary
        point.reach(MIDDLE)  # a kill mid-upload leaves no object
        _upload(temporary, path)
  point.reach(AFTER)


def _upload(source: epath.Path, destination: epath.Path) -> None:
  """Streams `source` into a new object `destination`; on failure the upload is abandoned
  (fsspec's `discard`), so no partial object is left (closing would commit it)."""
  with source.open("rb") as reader:
    writer = destination.open("wb")
    try:
      while block := reader.read(_COPY_BLOCK):
        writer.write(block)
    except BaseException:
      discard = getattr(writer, "discard", None)
      if discard is not None:
        discard()
      raise
    writer.close()


def write_bytes(
  path: epath.PathLike, data: bytes, *, kind: str, durable: bool = True
) -> epath.Path:
  """Writes `data` to `path` atomically (see the module docstring); returns `path`."""
  with replacing(path, kind=kind, durable=durable) as temporary:
    temporary.write_bytes(data)
  return epath.Path(path)


def write_text(path: epath.PathLike, text: str, *, kind: str) -> epath.Path:
  return write_bytes(path, text.encode("utf-8"), kind=kind)


def write_json(
  path: epath.PathLike, value: Any, *, kind: str, indent: int | None = 2
) -> epath.Path:
  """`value` as JSON with a final newline."""
  return write_text(path, json.dumps(value, indent=indent) + "\n", kind=kind)


def copy(source: epath.PathLike, destination: epath.PathLike, *, kind: str) -> epath.Path:
  """Copies one file atomically (the destination appears complete or not at all)."""
  source = epath.Path(source)
  with replacing(destination, kind=kind) as temporary, source.open("rb") as reader:
    with temporary.open("wb") as writer:
      while block := reader.read(_COPY_BLOCK):
        writer.write(block)
  return epath.Path(destination)


# ----------------------------------------------------------------------------- appends


def append_line(path: epath.PathLike, line: str, *, kind: str) -> None:
  """Appends one line (a newline is added) and flushes it to the operating system.

  Not synced to disk: call `sync(path)` where the line must outlive a power loss (before
  a checkpoint that counts on it). On an object store the object is rewritten whole.
  """
  path = epath.Path(path)
  data = (line + "\n").encode("utf-8")
  point = _WritePoint(kind, path, WHOLE_FILE)
  point.reach(BEFORE)
  with naming_full_disk(path):
    if _is_local(path):
      with path.open("ab") as f:
        point.reach(MIDDLE, lambda: (f.write(data[: len(data) // 2]), f.flush()))
        f.write(data)
        f.flush()
    else:
      point.reach(MIDDLE)
      previous = path.read_bytes() if path.exists() else b""
      with tempfile.TemporaryDirectory(prefix="cmvt_upload_") as scratch:
        temporary = epath.Path(scratch) / path.name
        temporary.write_bytes(previous + data)
        _upload(temporary, path)
  point.reach(AFTER)


def sync(path: epath.PathLike) -> None:
  """Forces a local file's appended lines to disk (nothing to do on an object store)."""
  path = epath.Path(path)
  if _is_local(path) and path.exists():
    with naming_full_disk(path):
      _fsync(path)


# ----------------------------------------------------------------------------- moves, removals


def move(source: epath.PathLike, destination: epath.PathLike, *, kind: str) -> epath.Path:
  """Moves a file or folder (a rename where the backend has one)."""
  point = _WritePoint(kind, destination, ATOMIC)
  point.reach(BEFORE)
  with naming_full_disk(destination):
    moved = epath.Path(source).rename(destination)
  point.reach(AFTER)
  return moved


def remove(path: epath.PathLike, *, kind: str) -> None:
  """Removes a file or a folder tree, if it exists.

  A tree is removed file by file (a kill in the middle leaves some of it).
  """
  path = epath.Path(path)
  if not path.exists():
    return
  if not path.is_dir():
    point = _WritePoint(kind, path, ATOMIC)
    point.reach(BEFORE)
    path.unlink(missing_ok=True)
    point.reach(AFTER)
    return
  point = _WritePoint(kind, path, WHOLE_FILE)
  point.reach(BEFORE)
  point.reach(MIDDLE, lambda: _remove_some(path))
  path.rmtree()
  point.reach(AFTER)


def _remove_some(folder: epath.Path) -> None:
  """Removes about half the files under a folder (what a kill mid-removal leaves)."""
  found = sorted(_files_under(folder))
  for path in found[: (len(found) + 1) // 2]:
    path.unlink()


def _files_under(folder: epath.Path) -> Iterator[epath.Path]:
  for path in folder.iterdir():
    if path.is_dir():
      yield from _files_under(path)
    else:
      yield path


def remove_temporaries(folder: epath.PathLike) -> list[epath.Path]:
  """Removes the temporaries that interrupted writes left directly in `folder`."""
  folder = epath.Path(folder)
  if not folder.is_dir():
    return []
  leftovers = sorted(folder.glob(f"*{TEMPORARY_SUFFIX}"))
  for path in leftovers:
    path.unlink(missing_ok=True)
  return leftovers


def probe_writable(folder: epath.PathLike, name: str) -> None:
  """Writes and removes a small file `name` in `folder`; raises OSError if it cannot."""
  probe = epath.Path(folder) / name
  write_bytes(probe, b"ok", kind="write-probe", durable=False)
  remove(probe, kind="write-probe-remove")
