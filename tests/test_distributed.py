"""Two processes (DDP over gloo on CPU) must train exactly like one process with the same global batch.

All the two-process runs share one launch (tests/ddp_worker.py runs them one after another in the same process
group); the single-process references run in the test's own process.

accelerate's own `--cpu` flag starts a single process unless MPI is set up, so the CPU launch here is
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` (torchrun underneath, gloo backend).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_metrics, write_rows

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def run(cmd: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    # Its own process group: on a timeout the launcher *and* its workers are killed, so no orphan keeps the output
    # pipes open (which would make the test wait forever instead of failing).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # say where it stopped, not only that it did
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        script = next((c for c in cmd if c.endswith(".py")), cmd[0])
        pytest.fail(f"{script} still running after 300 s\nstdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-3000:]


def free_port() -> int:
    """A port nothing listens on: each launch gets its own rendezvous, never one a previous launch (or another
    job on the machine) still holds at accelerate's default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process(script: str, argv: list[str]) -> None:
    """The single-process reference, in this process (as `python SCRIPT` runs main(), less the interpreter start)."""
    importlib.import_module(script).main(argv)


# Every two-process run of this file, planned here and launched once (tests/ddp_worker.py): a launch costs three
# interpreters and a rendezvous, the runs themselves a second each. Each test below checks its own run's outputs.
ALLREDUCE_LAYOUTS = ((1, 6), (3, 2))  # (--grad-accum, --batch-size): the same 12-row global batches
OTHER_SCRIPTS = ["sequence_level", "on_policy", "cross_tokenizer"]


def token_level_args(kit, folder: Path) -> list[str]:
    data = write_rows(folder / "d.jsonl", 24)
    # Held-out rows and problems sharded over the processes: 5 rows in rounds of 2 x 2 leave one process a round
    # without rows, which must still join the forward.
    held_out = write_rows(folder / "e.jsonl", 5, seed=9)
    problems = folder / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": json.loads(row)["messages"][-1]["content"], "answer": "#### 1"})
                                + "\n" for row in held_out.read_text().splitlines()[:3]))
    return ["--student", str(kit["student"]), "--teacher", str(kit["teacher"]), "--data", str(data),
            "--max-steps", "3", "--grad-accum", "2", "--lr", "1e-3", "--kl", "reverse", "--seed", "1",
            "--eval-data", str(held_out), "--eval-problems", str(problems), "--eval-every", "2",
            "--eval-batch-size", "2", "--eval-max-new-tokens", "4"]


@pytest.fixture(scope="module")
def two_processes(kit, tmp_path_factory) -> Path:
    """The folder where every two-process run of this module wrote its outputs (one launch, see above)."""
    folder = tmp_path_factory.mktemp("ddp")
    plan = [{"script": "token_level", "argv": [*token_level_args(kit, folder), "--batch-size", "2",
                                               "--output-dir", str(folder / "token_level")]}]
    data = write_rows(folder / "d24.jsonl", 24)
    for accum, batch in ALLREDUCE_LAYOUTS:
        argv = ["--student", str(kit["student"]), "--data", str(data), "--max-steps", "2", "--seed", "3",
                "--batch-size", str(batch), "--grad-accum", str(accum), "--output-dir", str(folder / f"run{accum}")]
        plan.append({"script": "sequence_level", "argv": argv, "count_allreduce": str(folder / f"calls{accum}")})
    data = write_rows(folder / "d8.jsonl", 8)
    for script in OTHER_SCRIPTS:
        argv = ["--student", str(kit["student"]), "--data", str(data), "--max-steps", "2", "--batch-size", "2",
                "--output-dir", str(folder / script)]
        if script == "on_policy":
            argv += ["--teacher", str(kit["teacher"]), "--lmbda", "1", "--max-new-tokens", "8"]
        if script == "cross_tokenizer":
            argv += ["--teacher", str(kit["teacher_llama"])]
        plan.append({"script": script, "argv": argv})
    plan.append({"fsdp": [str(kit["student"]), str(kit["teacher"]), str(folder / "fsdp_grads.pt")]})
    (folder / "plan.json").write_text(json.dumps(plan))
    run([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(ROOT / "tests" / "ddp_worker.py"),
         str(folder / "plan.json")])
    return folder


def test_token_level_two_processes_match_one(kit, tmp_path, two_processes):
    one_process("token_level", [*token_level_args(kit, tmp_path), "--batch-size", "4", "--output-dir",
                                str(tmp_path / "one")])
    one, two = read_metrics(tmp_path / "one"), read_metrics(two_processes / "token_level")
    assert [m["tokens"] for m in two] == [m["tokens"] for m in one]  # counted over both processes
    for key in ("loss", "ce", "div", "grad_norm"):  # grad_norm catches a missing x num_processes (Adam would not)
        assert [m[key] for m in two] == pytest.approx([m[key] for m in one], rel=1e-5), key
    assert [m["step"] for m in two if "eval_loss" in m] == [2, 3]
    for key in ("eval_loss", "eval_ce", "eval_div", "eval_kl", "eval_exact_match"):
        assert [m.get(key) for m in two if "eval_loss" in m] == pytest.approx(
            [m.get(key) for m in one if "eval_loss" in m], rel=1e-5), key

    start = load_file(kit["student"] / "model.safetensors")
    want = load_file(tmp_path / "one" / "model.safetensors")
    got = load_file(two_processes / "token_level" / "model.safetensors")
    assert max((want[k] - start[k]).abs().max().item() for k in want) > 1e-4  # the 3 steps did move the weights
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)


def test_one_gradient_all_reduce_per_optimizer_step(two_processes):
    """--grad-accum micro-batches accumulate locally and only the last one's backward all-reduces: a step costs the
    same all-reduces with 3 micro-batches as with 1 (counted by a DDP communication hook), and trains the same."""
    counts = {accum: [json.loads((two_processes / f"calls{accum}.{rank}.json").read_text()) for rank in (0, 1)]
              for accum, _ in ALLREDUCE_LAYOUTS}
    metrics = {accum: read_metrics(two_processes / f"run{accum}") for accum, _ in ALLREDUCE_LAYOUTS}
    assert counts[1][0] > 0 and counts[1][0] % 2 == 0  # 2 steps, the same number of buckets each
    assert counts[3] == counts[1]  # without the sync switch: three times as many
    # Different micro-batch layouts of the same 12-row global batches: the same losses and updates.
    for key in ("loss", "grad_norm", "tokens"):
        assert [m[key] for m in metrics[3]] == pytest.approx([m[key] for m in metrics[1]], rel=1e-5), key


@pytest.mark.parametrize("script", OTHER_SCRIPTS)
def test_other_scripts_run_on_two_processes(two_processes, script):
    assert [m["step"] for m in read_metrics(two_processes / script)] == [1, 2]
    assert (two_processes / script / "model.safetensors").exists()


def test_fsdp2_fused_loss_gradients_match_one_process(kit, two_processes):
    """accelerate cannot start FSDP on a CPU-only machine, so this runs torch's fully_shard directly (2 processes,
    gloo) on a tied-embedding student, as configs/fsdp.yaml does on GPUs, and checks every gradient."""
    import fsdp_worker

    sharded = torch.load(two_processes / "fsdp_grads.pt")
    student = fsdp_worker.tied_student(str(kit["student"]))
    input_ids, teacher_hidden, teacher_weight = fsdp_worker.batch_and_teacher(str(kit["teacher"]), 0, 1)
    fsdp_worker.fused_loss(student, input_ids, teacher_hidden, teacher_weight, 4 * 11).backward()
    want = dict(student.named_parameters())
    assert sharded.keys() == want.keys()
    for name, grad in sharded.items():
        torch.testing.assert_close(grad, want[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert want["model.embed_tokens.weight"].grad.abs().max() > 1e-3


def test_a_sharded_head_weight_is_refused_clearly():
    import common
    import losses

    with pytest.raises(common.DistillError, match="ZeRO-3"):
        losses.full_weight(torch.nn.Parameter(torch.empty(0)))  # DeepSpeed ZeRO-3's placeholder outside forward
