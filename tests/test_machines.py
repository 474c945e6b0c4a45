"""qlora_helpers.machines: the launch that passes a signal on to accelerate's launcher. The two-machine
runs themselves are tests/test_multinode.py's."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_helpers.paths import PROJECT_ROOT


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the launcher")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_train_stops_accelerates_launcher_too(sig, tmp_path):
    """Machine 1 launches at once and its launcher waits for machine 0 (never started here). A `kill`
    of the command used to end it alone: the launcher (and, once machine 0 came, its workers) went on
    detached; a SIGINT to it alone killed the launcher before it could stop its workers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "qlora_helpers", "train", "--config", "smoke", "--run-name", "sig",
           "--outputs-dir", str(tmp_path), "--num-machines", "2", "--machine-rank", "1",
           "--main-address", "127.0.0.1", "--main-port", str(port)]
    # SIGINT's default disposition, as a terminal gives it (a suite started in the background by a
    # non-interactive shell inherits SIGINT ignored)
    # output to a file: a launcher left behind would hold a pipe open
    log = tmp_path / "train.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    launcher = []
    try:
        deadline = time.monotonic() + 120
        while not launcher and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            launcher = _children(proc.pid)
        assert launcher, f"no launcher started: {log.read_text()[-2000:]}"
        time.sleep(2)  # the launcher's own signal handlers are in place
        proc.send_signal(sig)
        proc.wait(timeout=60)
        err = log.read_text()
        deadline = time.monotonic() + 30
        while _alive(launcher[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(launcher[0]), f"accelerate's launcher outlived `train` ({sig.name}): {err[-2000:]}"
        assert proc.returncode == 128 + sig, err[-2000:]
        assert f"train: stopped by {sig.name}; this machine's workers were stopped too." in err
    finally:
        for pid in [proc.pid, *launcher]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
