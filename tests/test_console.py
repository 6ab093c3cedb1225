"""Progress lines and log lines as a person reads them, on a terminal and in a log file."""

import io
import logging
import re

import pytest

from cmvt_jax import console


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def _screen(text: str) -> list[str]:
  """What a terminal shows of `text`: each carriage return restarts its line."""
  text = text.replace("\x1b[K", "")
  return [line.split("\r")[-1] for line in text.split("\n")]


@pytest.fixture
def clock(monkeypatch):
  """console's time, moved by hand."""
  now = [1000.0]
  monkeypatch.setattr(console.time, "perf_counter", lambda: now[0])
  return now


def test_a_log_file_gets_milestones_a_line_after_a_quiet_while_and_the_end(clock):
  log = io.StringIO()
  stage = console.Stage("prepare", 4, "videos", stream=log)
  stage.advance()  # at once: nothing (start-up rates say nothing)
  clock[0] += 31
  stage.advance(note="9 clips")  # 31 s without a line
  clock[0] += 1
  stage.advance()
  stage.update(3, note="12 clips", milestone=True)
  clock[0] += 1
  stage.finish(note="16 clips in /data")
  lines = log.getvalue().splitlines()
  assert lines == [
    "prepare    2/4 videos   50%  0:31  ETA 0:31  9 clips",
    "prepare    3/4 videos   75%  0:32  ETA 0:11  12 clips",
    "prepare    4/4 videos  100%  0:33  16 clips in /data",
  ]


def test_a_terminal_line_is_redrawn_in_place_and_stays_when_done(clock):
  terminal = _Terminal()
  with console.Stage("export", 3, "clips", stream=terminal) as stage:
    for _ in range(3):
      clock[0] += 1
      stage.advance()
  assert terminal.getvalue().count("\r") == 4  # three redraws and the final line
  assert _screen(terminal.getvalue()) == ["export     3/3 clips  100%  0:03", ""]


def test_a_terminal_redraws_at_most_five_times_a_second(clock):
  terminal = _Terminal()
  stage = console.Stage("train", 1000, "steps", stream=terminal, eta=False)
  for _ in range(100):
    clock[0] += 0.01  # 100 steps in one second
    stage.advance()
  assert 4 <= terminal.getvalue().count("\r") <= 6


def test_a_new_stage_keeps_the_line_of_one_left_open(clock):
  terminal = _Terminal()
  train = console.Stage("train", 10, "steps", stream=terminal, eta=False)
  train.update(5, note="loss 1.0")
  with console.Stage("evaluate", 2, "clips", stream=terminal) as evaluation:
    evaluation.advance(2)
  train.update(10, note="loss 0.5")
  train.finish()
  assert [line for line in _screen(terminal.getvalue()) if line] == [
    "train      5/10 steps   50%  0:00  loss 1.0",
    "evaluate   2/2 clips  100%  0:00",
    "train      10/10 steps  100%  0:00  loss 0.5",
  ]


def test_a_disabled_stage_writes_nothing(clock):
  log = io.StringIO()
  with console.Stage("plots", 4, "figures", enabled=False, stream=log) as stage:
    stage.advance(4, note="x")
  assert log.getvalue() == ""


def test_an_error_leaves_the_line_where_it_got_and_the_cursor_at_a_line_start(clock):
  terminal = _Terminal()
  with pytest.raises(RuntimeError), console.Stage("export", 4, "clips", stream=terminal) as stage:
    stage.advance()
    raise RuntimeError("disk")
  assert terminal.getvalue().endswith("\n")
  assert "1/4 clips" in _screen(terminal.getvalue())[0]


def test_durations():
  assert [console.duration(s) for s in (0, 7.4, 125, 3725)] == ["0:00", "0:07", "2:05", "1:02:05"]


def _record(level, pathname, message="hello"):
  return logging.LogRecord("absl", level, pathname, 12, message, None, None)


def test_the_packages_info_lines_are_short_and_the_rest_keep_their_format():
  fallback = logging.Formatter("FULL %(levelname)s %(message)s")
  formatter = console.LogFormatter(fallback)
  own = formatter.format(_record(logging.INFO, "/x/cmvt_jax/train.py"))
  assert re.fullmatch(r"\d\d:\d\d:\d\d hello", own)
  assert formatter.format(_record(logging.WARNING, "/x/cmvt_jax/train.py")) == "FULL WARNING hello"
  assert formatter.format(_record(logging.INFO, "/x/orbax/manager.py")) == "FULL INFO hello"


def test_a_log_line_first_clears_a_stage_line_being_redrawn(clock):
  terminal = _Terminal()
  stage = console.Stage("train", 10, "steps", stream=terminal, eta=False)
  stage.update(3)
  line = console.LogFormatter(logging.Formatter("%(message)s")).format(
    _record(logging.WARNING, "/x/cmvt_jax/train.py", "careful")
  )
  assert line == "\r\x1b[Kcareful"
  stage.finish()


def test_library_info_lines_and_warnings_with_nothing_to_act_on_are_dropped():
  keep = console.OwnInfoOnly().filter
  assert keep(_record(logging.INFO, "/x/cmvt_jax/train.py"))
  assert not keep(_record(logging.INFO, "/x/orbax/checkpoint_manager.py"))
  assert keep(_record(logging.WARNING, "/x/orbax/checkpoint_manager.py", "Skipping step 4"))
  notice = "Given directory is read only=/run/checkpoints"
  assert not keep(_record(logging.WARNING, "/x/orbax/checkpoint_manager.py", notice))
