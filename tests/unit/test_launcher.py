"""The launcher's teardown: a stopped process leaves nothing of its group behind."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil

from bench.launcher import spawn, stop

# A leader that starts a child which outlives it (as a stuck gateway worker would), prints the
# child's pid and waits.
LEADER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    """A child the leader leaves behind is killed with its group when the leader is stopped."""
    log = tmp_path / "leader.log"
    leader = spawn([sys.executable, "-c", LEADER], log)
    deadline = time.monotonic() + 20
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = psutil.Process(int(log.read_text().strip()))
    try:
        stop(leader, timeout=5)
        assert leader.returncode is not None
        child.wait(timeout=5)  # psutil.TimeoutExpired if the child outlived the stop
        assert not child.is_running()
    finally:
        if child.is_running():
            child.kill()
