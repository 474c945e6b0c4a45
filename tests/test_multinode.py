"""Two "machines" on one host: `train --num-machines 2` launched twice (machine rank 0 and 1), CPU
processes talking gloo over 127.0.0.1, must train the same adapter as one process with the same
global batch. Both launches run at once; the test waits on their exit, never on a clock."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_helpers.cli import accelerate_command, build_parser, check_layout
from qlora_helpers.errors import QLoraError

# Three optimizer steps of the smoke profile; no dropout (its masks would differ by process), no
# held-out loss (stage 05's job, and CPU time on the 2-core CI).
COMMON = ["train.wandb=disabled", "train.eval_samples=0", "train.max_steps=3", "train.save_steps=1000",
          "train.learning_rate=5e-3", "lora.dropout=0.0", "train.gradient_accumulation_steps=1"]
TIMEOUT_S = 480  # a hung rendezvous fails the test instead of the whole CI run

Done = subprocess.CompletedProcess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(outputs: Path, run_name: str, overrides: list[str], *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "qlora_helpers", "train", "--config", "smoke", "--run-name", run_name,
           "--outputs-dir", str(outputs), *extra]
    return cmd + [x for o in overrides for x in ("--set", o)]


def _env() -> dict[str, str]:
    # one thread per process: two processes share the 2-core CI machine
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _adapter(outputs: Path, run_name: str) -> dict[str, torch.Tensor]:
    return load_file(outputs / run_name / "adapter" / "adapter_model.safetensors")


def _two_machines(outputs: Path, run_name: str, overrides: dict[int, list[str]]) -> dict[int, Done]:
    """Machines 1 and 0 (`overrides` by rank) launched at once, to the end of both: their exit and output."""
    port = _free_port()
    machines = {rank: subprocess.Popen(
        _train(outputs, run_name, overrides[rank], "--num-machines", "2", "--machine-rank", str(rank),
               "--main-address", "127.0.0.1", "--main-port", str(port)),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (1, 0)}
    done = {}
    try:
        for rank in (0, 1):  # machine 0 first: if it fails, machine 1 would wait for it until the timeout
            out = machines[rank].communicate(timeout=TIMEOUT_S)[0]
            done[rank] = Done(machines[rank].args, machines[rank].returncode, out)
    finally:
        for proc in machines.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def test_two_machines_train_the_adapter_of_one_process_with_the_same_global_batch(tmp_path, tiny_dir):
    runs = _two_machines(tmp_path, "two", {rank: [*COMMON, "train.micro_batch_size=2"] for rank in (0, 1)})
    logs = {rank: done.stdout for rank, done in runs.items()}
    for rank, done in runs.items():
        assert done.returncode == 0, f"machine {rank}:\n{done.stdout[-4000:]}"
    one = subprocess.run(_train(tmp_path, "one", [*COMMON, "train.micro_batch_size=4"]), env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
    assert one.returncode == 0, one.stdout[-4000:]
    two, single = _adapter(tmp_path, "two"), _adapter(tmp_path, "one")
    assert two.keys() == single.keys() and len(two) == 8  # q, v x A, B x 2 layers
    for name in two:
        torch.testing.assert_close(two[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
    # LoRA's B matrices start at zero: three steps must have moved them (an equal pair of untrained
    # adapters would prove nothing)
    assert all(single[n].abs().max() > 1e-4 for n in single if "lora_B" in n)
    assert "Adapter saved to" in logs[0] and "Adapter saved to" not in logs[1]  # world rank 0 writes it


def test_machines_started_with_other_settings_both_stop_and_say_which(tmp_path, tiny_dir):
    """Machine 1's --set differs: its workers used to train with machine 0's settings without a word
    (the run folder's), both exiting 0; a stale run folder on machine 1 made machine 0 die on gloo."""
    runs = _two_machines(tmp_path, "differ", {0: COMMON, 1: [*COMMON, "train.max_steps=4"]})
    said = ("error: The machines of this run disagree, so none trains: machine 1 was started with other settings "
            "than machine 0 set run 'differ' up with (train.max_steps: now 4, run has 3): give every machine the "
            "same --config and --set.")
    for rank, done in runs.items():
        assert done.returncode == 1 and said in done.stdout, f"machine {rank}:\n{done.stdout[-4000:]}"
    assert not (tmp_path / "differ" / "adapter").exists()


def _args(*argv: str):
    return build_parser().parse_args(["train", "--config", "smoke", *argv])


def test_the_launch_names_the_machine_layout_and_the_accelerate_config():
    args = _args("--num-processes", "4", "--num-machines", "2", "--machine-rank", "1",
                 "--main-address", "10.0.0.1", "--main-port", "29600", "--set", "train.max_steps=5")
    check_layout(args)
    cmd = accelerate_command(args, "run1", "fsdp")
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags["--config_file"].endswith("configs/accelerate/fsdp.yaml") and Path(flags["--config_file"]).is_file()
    assert (flags["--num_machines"], flags["--num_processes"], flags["--machine_rank"]) == ("2", "8", "1")
    assert (flags["--main_process_ip"], flags["--main_process_port"]) == ("10.0.0.1", "29600")
    assert cmd[-4:] == ["--run-name", "run1", "--set", "train.max_steps=5"]
    single = accelerate_command(_args("--num-processes", "2"), "run1", "ddp")
    assert "--machine_rank" not in single and single[single.index("--num_processes") + 1] == "2"


@pytest.mark.parametrize("argv, words", [
    (["--num-machines", "2"], "--main-address"),
    (["--num-machines", "2", "--machine-rank", "2", "--main-address", "h"], "outside 0 .. 1"),
    (["--num-processes", "0"], "at least 1"),
    (["--num-machines", "2", "--main-address", "h", "--main-port", "70000"], r"--main-port 70000 is not a TCP port"),
    (["--main-port", "0"], r"--main-port 0 is not a TCP port: use 1 .. 65535"),
])
def test_a_wrong_machine_layout_is_refused_before_anything_runs(argv, words):
    with pytest.raises(QLoraError, match=words):
        check_layout(_args(*argv))


def test_the_accelerate_configs_parse_as_accelerate_reads_them():
    from accelerate.commands.config.config_args import load_config_from_file

    from qlora_helpers.cli import ACCELERATE_CONFIGS

    fsdp = load_config_from_file(str(ACCELERATE_CONFIGS / "fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
    ddp = load_config_from_file(str(ACCELERATE_CONFIGS / "ddp.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.mixed_precision == "no"


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_port_out_of_range_is_a_usage_error_before_the_run_is_set_up(rank, tmp_path, capsys):
    from qlora_helpers.cli import main

    # machine 0 set the run up and prepared the data, then accelerate died with an OverflowError
    code = main(["train", "--config", "smoke", "--run-name", "port", "--outputs-dir", str(tmp_path),
                 "--num-machines", "2", "--machine-rank", rank, "--main-address", "127.0.0.1", "--main-port", "70000"])
    assert code == 2 and list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert "train: error: --main-port 70000 is not a TCP port: use 1 .. 65535" in err and "Traceback" not in err


def test_train_help_explains_every_option():
    """`train --help` listed --set with no word on it; with several machines it must be the same on each."""
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    silent = [a.option_strings[0] for a in train._actions if a.option_strings and not a.help]
    assert silent == []
    helps = {a.option_strings[0]: a.help for a in train._actions if a.option_strings}
    assert "the same on each" in helps["--set"] and "every machine sees" in helps["--outputs-dir"]
