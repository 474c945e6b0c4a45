"""The processes of one `train --num-processes N --num-machines M`: launching this machine's workers
through accelerate."""

from __future__ import annotations

import signal
import subprocess
import sys

# What a terminal, `kill` or a lost ssh session sends; torchrun's agent stops its workers on each.
FORWARDED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def launch(cmd: list[str]) -> int:
    """Run accelerate's launcher `cmd` and wait for it. SIGINT, SIGTERM and SIGHUP that reach this
    process reach it as SIGTERM, which stops it at once even while it waits for the other machines
    (a SIGINT waits there until a connection attempt gives up) and makes it stop its workers. torchrun
    starts each worker in a session of its own, so nothing else reaches them: a `kill` of this process
    used to leave the launcher and its workers training on, detached, and a Ctrl-C (the launcher killed
    0.25 s later by subprocess) could leave the workers alone. The launcher gets a session of its own
    too, so that a terminal's Ctrl-C reaches it once, through here. A signal ignored here (nohup)
    stays ignored. Returns the launcher's exit status, or 128 + the signal's number when one stopped it."""
    got: list[int] = []
    procs: list[subprocess.Popen] = []

    def forward(signum, _frame):
        got.append(signum)
        if procs:
            procs[0].terminate()

    caught = [s for s in FORWARDED if signal.getsignal(s) is not signal.SIG_IGN]
    before = {s: signal.signal(s, forward) for s in caught}
    try:
        procs.append(subprocess.Popen(cmd, start_new_session=True))
        if got:  # a signal came before the launcher existed
            procs[0].terminate()
        code = procs[0].wait()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if got:
        print(f"train: stopped by {signal.Signals(got[0]).name}; this machine's workers were stopped too.",
              file=sys.stderr)
        return 128 + got[0]
    return code
