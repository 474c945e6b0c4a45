"""The processes of one `train --num-processes N --num-machines M`: launching this machine's workers
through accelerate, and the workers' check that every machine was started on the same run.

Each machine's command is typed by hand (or by a Slurm script), so the machines can disagree: another
--run-name, --config or --set, another --num-processes, an --outputs-dir that is not the shared folder
machine 0 set the run up in (or an old copy of it). Every worker opens the run, says what it sees, and
all of them compare before the first training step: on a disagreement every process stops with the
same message naming the machine at fault, instead of machine 1 training with machine 0's settings
without a word, or machine 0 dying on gloo's 'Connection closed by peer'.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys

from .config import load_config
from .errors import QLoraError
from .opening import config_differences, open_run
from .paths import run_dir
from .runs import NotSetUp

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


def check_port_free(port: int) -> None:
    """Machine 0's --main-port, before the run is set up: accelerate refuses a port in use only after the
    data are prepared (minutes on a real data set), naming its own option (--main_process_port). The
    same test as accelerate's: something answers on localhost:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if s.connect_ex(("localhost", port)) != 0:
            return
    raise QLoraError(f"--main-port {port} is in use on this machine (machine 0), where the machines meet: "
                     f"start every machine again with another --main-port, e.g. {port + 1 if port < 65535 else 29500} "
                     f"(stop the others first: they may be waiting on whatever holds port {port}).")


def _digest(run) -> str:
    """The run's config.json and env.json as this machine reads them (a copy differs from the original
    in env.json at least: machine 0's inspection of the moment)."""
    sha = hashlib.sha256()
    for path in (run.config_file, run.env_file):
        sha.update(path.read_bytes())
    return sha.hexdigest()[:16]


def worker_facts(args, run_name: str, run, problem: str | None) -> dict:
    """What this worker was asked and what it sees of the run (`run` None: it could not open it, and
    `problem` says why)."""
    from .trainer import resolve_checkpoint  # transformers: a worker has it loaded anyway

    # the launch layout is torchrun's (a worker's own command line has none of it): GROUP_RANK is the
    # machine's rank, LOCAL_WORLD_SIZE its --num-processes
    facts = {"machine": int(os.environ.get("GROUP_RANK", "0")), "run_name": run_name,
             "processes": int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
             "folder": str(run_dir(run_name, args.outputs_dir, create=False)),
             "problem": problem, "differs": [], "setup": None, "resume": None}
    if run is not None:
        try:
            asked = load_config(args.config, args.overrides)
            facts.update(differs=config_differences(asked, run.cfg), setup=_digest(run),
                         files=" or ".join(path.name for path in (run.config_file, run.env_file)),
                         resume=resolve_checkpoint(run.cfg.train.resume, run.checkpoints_dir, "train.resume"))
        except QLoraError as exc:  # this machine's --config or --set is wrong; its parent checked them, so rare
            facts["problem"] = str(exc)
    return facts


def _complaint(facts: dict, main: dict) -> str | None:
    """What is wrong with one worker's facts against world rank 0's (`main`, machine 0's)."""
    m, name = facts["machine"], main["run_name"]
    if facts["run_name"] != name:
        return (f"machine {m} was started with --run-name {facts['run_name']}, machine 0 with {name}: give "
                f"every machine the same --run-name, --config and --set")
    if facts["processes"] != main["processes"]:
        return (f"machine {m} was started with --num-processes {facts['processes']}, machine 0 with "
                f"{main['processes']}: give every machine the same --num-processes (the global batch counts "
                f"N x M processes)")
    if facts["problem"]:
        return (f"machine {m} cannot open run {name!r} in {facts['folder']} ({facts['problem']}); with several "
                f"machines --outputs-dir must be a folder every machine sees (a shared filesystem): machine 0 "
                f"set the run up in {main['folder']}")
    if facts["setup"] != main["setup"] or facts["resume"] != main["resume"]:  # before the settings: a copy's differ too
        seen = (f"it would resume from {facts['resume'] or 'no checkpoint'}, machine 0 from "
                f"{main['resume'] or 'no checkpoint'}"
                if facts["setup"] == main["setup"] else f"its {facts['files']} differ from machine 0's")
        return (f"machine {m} reads another copy of run {name!r} in {facts['folder']} ({seen}): --outputs-dir "
                f"must be the folder machine 0 set the run up in ({main['folder']}), shared by every machine")
    if facts["differs"]:
        return (f"machine {m} was started with other settings than machine 0 set run {name!r} up with "
                f"({'; '.join(facts['differs'][:5])}): give every machine the same --config and --set")
    return None


def disagreement(every: list[dict]) -> str | None:
    """One message for all the workers' complaints (a machine's processes say the same: once), or None
    when every worker agrees with world rank 0."""
    found = [c for c in (_complaint(facts, every[0]) for facts in every) if c]
    if not found:
        return None
    return (f"The machines of this run disagree, so none trains: {'; '.join(dict.fromkeys(found))}. "
            f"(docs/multi-node.md)")


def open_run_in_worker(args, run_name: str):
    """A worker opens the run once machine 0's parent prepared it (it was launched after): rank 0
    opens it first while the others wait at a barrier of the process group (machines other than 0
    start their workers at once; a shared filesystem carries the run folder to them). Then every
    worker compares what it was asked and sees with rank 0 (`disagreement`): all go on, or all stop."""
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    # the backend Trainer will pick: gloo on CPU, nccl on CUDA (PartialState is one per process)
    run, problem = None, None
    with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
        try:
            run = open_run(run_name, args.outputs_dir)  # machine 0's parent set it up with these settings
        except NotSetUp:
            problem = "stage 01 never set it up there"
        except QLoraError as exc:
            problem = str(exc)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, worker_facts(args, run_name, run, problem))
    message = disagreement(every)
    if message:
        raise QLoraError(message)
    return run
