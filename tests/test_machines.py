"""qlora_helpers.machines: the workers' check that every machine was started on the same run, and the
launch that passes a signal on to accelerate's launcher. The two-machine runs themselves (and a
disagreement seen from both machines) are tests/test_multinode.py's."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_helpers.machines import disagreement
from qlora_helpers.paths import PROJECT_ROOT


def _facts(machine: int = 0, **changes) -> dict:
    facts = {"machine": machine, "run_name": "two", "processes": 8, "folder": "/shared/outputs/two",
             "problem": None, "differs": [], "setup": "abc", "resume": None, "files": "config.json or env.json"}
    return {**facts, **changes}


def test_workers_that_agree_train():
    assert disagreement([_facts(), _facts(), _facts(1), _facts(1)]) is None


@pytest.mark.parametrize("changes, words", [
    ({"run_name": "other"}, "machine 1 was started with --run-name other, machine 0 with two"),
    ({"processes": 4}, "machine 1 was started with --num-processes 4, machine 0 with 8"),
    ({"problem": "stage 01 never set it up there", "folder": "/local/two", "setup": None},
     "machine 1 cannot open run 'two' in /local/two (stage 01 never set it up there); with several machines "
     "--outputs-dir must be a folder every machine sees (a shared filesystem): machine 0 set the run up in "
     "/shared/outputs/two"),
    # an old copy of the run on machine 1's own disk: its settings differ too, but the folder is the cause
    ({"setup": "def", "differs": ["train.max_steps: now 3, run has 5"], "folder": "/local/two"},
     "machine 1 reads another copy of run 'two' in /local/two (its config.json or env.json differ"),
    ({"resume": "/local/two/checkpoints/checkpoint-2", "folder": "/local/two"},
     "it would resume from /local/two/checkpoints/checkpoint-2, machine 0 from no checkpoint"),
    ({"differs": ["train.learning_rate: now 0.001, run has 0.0002"]},
     "machine 1 was started with other settings than machine 0 set run 'two' up with "
     "(train.learning_rate: now 0.001, run has 0.0002): give every machine the same --config and --set"),
])
def test_a_machine_that_disagrees_is_named_once_for_all_its_processes(changes, words):
    message = disagreement([_facts(), _facts(), _facts(1, **changes), _facts(1, **changes)])
    assert message.startswith("The machines of this run disagree, so none trains: ") and words in message
    assert message.count("machine 1 ") == 1  # both of machine 1's processes said it


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


def test_a_port_in_use_on_machine_0_is_said_before_the_run_is_set_up(tmp_path, capsys):
    """accelerate refused it only after stages 01 and 03 (minutes on real data), naming --main_process_port."""
    from qlora_helpers.cli import main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code = main(["train", "--config", "smoke", "--run-name", "busy", "--outputs-dir", str(tmp_path),
                     "--num-machines", "2", "--main-address", "127.0.0.1", "--main-port", str(port)])
    assert code == 1 and list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert f"error: --main-port {port} is in use on this machine (machine 0), where the machines meet" in err
