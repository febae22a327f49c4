"""run.lock: one writer per run folder, named in the refusal, taken over once its process is gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.finetune import run_lock

HOLD = """
import sys, time
from llmprune.engine.finetune import run_lock
run_lock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_acquire_writes_the_owner_and_release_removes_it(tmp_path):
    run_lock.acquire(tmp_path)
    owner = json.loads((tmp_path / run_lock.LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"]
    assert run_lock.live_owner(tmp_path) is None  # this process's own lock is no stranger's
    run_lock.acquire(tmp_path)  # taking it again in the same process is a no-op
    run_lock.release(tmp_path)
    assert not (tmp_path / run_lock.LOCK_FILE).exists()


def test_a_live_owner_is_named_and_a_dead_one_is_taken_over(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        owner = run_lock.live_owner(tmp_path)
        assert owner is not None and owner.pid == holder.pid
        with pytest.raises(UserInputError, match=f"is being written by process {holder.pid} on") as refused:
            run_lock.acquire(tmp_path)
        assert f"kill -TERM {holder.pid}" in refused.value.hint
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 60
    while run_lock.live_owner(tmp_path) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / run_lock.LOCK_FILE).is_file()  # left behind by the killed process
    with run_lock.holding(tmp_path):
        assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / run_lock.LOCK_FILE).exists()
