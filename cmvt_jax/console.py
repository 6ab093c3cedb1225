"""What a person running the package reads: one progress line per stage, and short log lines.

A run goes through stages (generate, prepare, train, evaluate, export, plots); each shows one
line, e.g.

  prepare   608/608 videos  100%  0:09  2432 clips

On a terminal the line is redrawn in place as the stage advances (a few times a second) and
stays, finished, when it ends. Elsewhere (a log file, CI) a line is printed when the stage
ends, at the points its owner marks (`milestone=True`: training's logged steps) and after
`_QUIET_SECONDS` without a line, so a log holds the same facts without redraws. Lines go to
standard error, where the log goes.

`LogFormatter` gives the package's own INFO log lines the same plain look (time and message,
without absl's file and thread prefix); warnings and errors keep absl's full prefix, which
says where they came from. While a stage line is being redrawn on a terminal, a log line
first clears it (the stage draws itself again on its next update). `plain_logs` sets up a
command line's log so (libraries' INFO lines dropped), as `main` and `search` do.
"""

from __future__ import annotations

import logging as logging_lib
import sys
import time
from typing import TextIO

from absl import logging

# A terminal line is redrawn at most this often (seconds).
_REDRAW_SECONDS = 0.2
# Off a terminal, a running stage prints a line at least this often (seconds).
_QUIET_SECONDS = 30.0
_NAME_WIDTH = 9

# The stage whose line is on the terminal now, unfinished (None: the cursor is at a line start).
_open_line: Stage | None = None


class Stage:
  """One stage's progress line (see the module docstring); a context manager that finishes it.

  Args:
    name: the stage (`generate`, `prepare`, `train`, ...).
    total: units of work, or None when unknown.
    unit: what is counted (`videos`, `clips`, `steps`).
    enabled: False makes every call do nothing (processes other than the first, tests).
    eta: show an ETA from the rate so far (training gives its own, without evaluations).
    stream: where lines go (default: standard error).
  """

  def __init__(
    self,
    name: str,
    total: int | None,
    unit: str,
    *,
    enabled: bool = True,
    eta: bool = True,
    stream: TextIO | None = None,
  ):
    self.name, self.total, self.unit = name, total, unit
    self.enabled, self._eta = enabled, eta
    self._stream = stream or sys.stderr
    self._terminal = bool(getattr(self._stream, "isatty", lambda: False)())
    self._started = time.perf_counter()
    self._done = 0
    self._note = ""
    # A terminal shows the line at once; a log gets its first line after a quiet while
    # (the first updates' rates and ETAs are mostly start-up).
    self._drawn = float("-inf") if self._terminal else self._started
    self._finished = False

  def __enter__(self) -> Stage:
    return self

  def __exit__(self, kind, value, traceback) -> None:
    if kind is None:
      self.finish()
    else:  # leave the line as far as it got, and the cursor at a line start for the error
      self._close_line()

  def advance(self, count: int = 1, *, note: str | None = None) -> None:
    """Counts `count` more units done."""
    self.update(self._done + count, note=note)

  def update(self, done: int, *, note: str | None = None, milestone: bool = False) -> None:
    """Sets the units done (and the text after the counts); `milestone` prints a line off a
    terminal too."""
    if not self.enabled or self._finished:
      return
    self._done = done
    if note is not None:
      self._note = note
    now = time.perf_counter()
    if self._terminal:
      if milestone or now - self._drawn >= _REDRAW_SECONDS:
        self._draw(now, end="")
    elif milestone or now - self._drawn >= _QUIET_SECONDS:
      self._draw(now, end="\n")

  def finish(self, note: str | None = None) -> None:
    """Ends the stage: its last line, with the total time, stays on the screen."""
    if not self.enabled or self._finished:
      return
    if note is not None:
      self._note = note
    if self.total is not None:
      self._done = max(self._done, self.total)
    self._draw(time.perf_counter(), end="\n", final=True)
    self._finished = True

  def line(self, now: float | None = None, *, final: bool = False) -> str:
    """The stage's line as it would be drawn now."""
    elapsed = (now or time.perf_counter()) - self._started
    parts = [f"{self.name:<{_NAME_WIDTH}}"]
    if self.total:
      parts.append(f"{self._done}/{self.total} {self.unit}  {100 * self._done / self.total:3.0f}%")
    else:
      parts.append(f"{self._done} {self.unit}")
    parts.append(duration(elapsed))
    if self._eta and not final and self.total and 0 < self._done < self.total:
      parts.append(f"ETA {duration(elapsed / self._done * (self.total - self._done))}")
    if self._note:
      parts.append(self._note)
    return "  ".join(parts)

  def _draw(self, now: float, *, end: str, final: bool = False) -> None:
    global _open_line
    text = self.line(now, final=final)
    if self._terminal:
      if _open_line is not None and _open_line is not self:  # another stage's line stays
        self._stream.write("\n")
      self._stream.write(f"\r{text}\x1b[K{end}")
      _open_line = None if end else self
    else:
      self._stream.write(text + end)
    self._stream.flush()
    self._drawn = now

  def _close_line(self) -> None:
    global _open_line
    if _open_line is self:
      self._stream.write("\n")
      self._stream.flush()
      _open_line = None
    self._finished = True


def duration(seconds: float) -> str:
  """`0:07`, `2:05`, `1:02:05` (hours only when needed)."""
  seconds = int(round(max(seconds, 0.0)))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class LogFormatter(logging_lib.Formatter):
  """The package's INFO lines as `HH:MM:SS message`; everything else as `fallback` formats it.

  Args:
    fallback: the formatter of warnings, errors and other libraries' lines (absl's).
  """

  def __init__(self, fallback: logging_lib.Formatter):
    super().__init__()
    self._fallback = fallback

  def format(self, record: logging_lib.LogRecord) -> str:
    if record.levelno == logging_lib.INFO and "cmvt_jax" in record.pathname:
      text = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.getMessage()}"
    else:
      text = self._fallback.format(record)
    if _open_line is not None and _open_line._terminal:
      # The stage line being redrawn has no newline yet: clear it first.
      text = "\r\x1b[K" + text
    return text


# Libraries' warnings that say nothing a person could act on, by their text's start.
_NOTHING_TO_ACT_ON = (
  # orbax, whenever a CheckpointManager opens read-only: evaluation, export, plots and search
  # read checkpoints that way on purpose (checkpoints.reader).
  "Given directory is read only",
)


class OwnInfoOnly(logging_lib.Filter):
  """Keeps cmvt_jax's INFO lines and every library's warnings but those in
  `_NOTHING_TO_ACT_ON`; drops libraries' INFO chatter."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    if "cmvt_jax" in record.pathname:
      return True
    if record.levelno < logging_lib.WARNING:
      return False
    return not record.getMessage().startswith(_NOTHING_TO_ACT_ON)


def plain_logs() -> logging_lib.Handler:
  """A command line's log at `--verbosity=0`: the package's INFO lines in `LogFormatter`'s
  plain look, libraries' warnings and errors with absl's prefix, none of their INFO lines
  (orbax's, TFDS's). Call once flags are parsed; returns absl's handler set up so."""
  handler = logging.get_absl_handler()
  handler.addFilter(OwnInfoOnly())
  handler.setFormatter(LogFormatter(logging.PythonFormatter()))
  return handler
