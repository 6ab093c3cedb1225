"""The multi-host stop vote: how often the processes vote, and that every SIGTERM is heeded.

Two processes are simulated in one: the gather returns this process's vote for both, and a
fake clock sets how long each step takes.
"""

import signal

import numpy as np
import pytest

from cmvt_jax import sharding
from cmvt_jax import train


@pytest.fixture
def two_processes(monkeypatch):
  votes = []
  clock = {"now": 0.0}

  def allgather(values):
    votes.append(np.asarray(values))
    return np.stack([np.asarray(values), np.asarray(values)])

  monkeypatch.setattr(train.jax, "process_count", lambda: 2)
  monkeypatch.setattr(sharding.multihost_utils, "process_allgather", allgather)
  monkeypatch.setattr(train.time, "perf_counter", lambda: clock["now"])
  return votes, clock


def test_processes_vote_every_few_seconds_and_stop_on_a_sigterm(two_processes):
  votes, clock = two_processes
  stop = train.StopSignal(vote_seconds=5.0)
  try:
    decisions = {}
    for step in range(1, 12):
      clock["now"] = float(step)  # step k ends k seconds after the start
      if step == 3:
        stop._handle(signal.SIGTERM, None)
      decisions[step] = stop.should_stop(step)
  finally:
    stop.restore_handler()
  # Step 1 votes (one second per step since the start), then every 5 steps of one second.
  assert len(votes) == 3
  assert [step for step, stopping in decisions.items() if stopping] == [6, 11]
  assert stop.stopped
  assert not any(decisions[step] for step in (1, 2, 3, 4, 5, 7, 8, 9, 10))


def test_a_forced_vote_sees_the_signal_at_once(two_processes):
  stop = train.StopSignal(vote_seconds=5.0)
  try:
    assert not stop.should_stop(1)
    stop._handle(signal.SIGTERM, None)
    assert not stop.should_stop(2)
    assert stop.should_stop(2, vote_now=True)  # e.g. the last step, or after an evaluation
  finally:
    stop.restore_handler()


def test_vote_seconds_zero_votes_every_step(two_processes):
  votes, clock = two_processes
  stop = train.StopSignal(vote_seconds=0.0)
  try:
    for step in range(1, 5):
      clock["now"] = float(step)
      stop.should_stop(step)
  finally:
    stop.restore_handler()
  assert len(votes) == 4
