"""The pre-flight is an explicit step before the first update in every script with a teacher, whatever the
teacher's source, and again after --resume; it changes nothing the run trains (RNG, modes and weights put back)."""

from __future__ import annotations

import math

import pytest
import torch

import cache_teacher
import checks
import common
import cross_tokenizer
import on_policy
import token_level
import training
from conftest import read_metrics, write_rows

PREFLIGHT = "pre-flight on the first batch"


def run(script, kit, data, out, *extra, student="student"):
    script.main(["--student", str(kit[student]), "--teacher", str(kit["teacher"]), "--data", str(data),
                 "--output-dir", str(out), "--max-steps", "3", "--batch-size", "2", "--log-every", "100", *extra])


@pytest.fixture(scope="module")
def topk_cache(kit, tmp_path_factory):
    folder = tmp_path_factory.mktemp("preflight")
    data = write_rows(folder / "d.jsonl", 8)
    cache_teacher.main(["--teacher", str(kit["teacher"]), "--data", str(data), "--output", str(folder / "cache"),
                        "--top-k", "8", "--temperatures", "1", "2"])
    return data, folder / "cache"


@pytest.mark.parametrize("case", ["token_level live", "token_level topk cache", "cross_tokenizer live",
                                  "cross_tokenizer topk cache", "on_policy live"])
def test_every_script_with_a_teacher_runs_the_preflight_once_before_step_1(kit, topk_cache, tmp_path, monkeypatch,
                                                                            capsys, case):
    data, cache = topk_cache
    calls = []
    preflight = training.preflight

    def recording(loop, check):  # when it runs: before the loop's first step, never inside it
        calls.append(loop.step_num)
        return preflight(loop, check)

    monkeypatch.setattr(training, "preflight", recording)
    script = {"token_level": token_level, "cross_tokenizer": cross_tokenizer, "on_policy": on_policy}[case.split()[0]]
    extra = ["--teacher-cache", str(cache)] if "cache" in case else []
    run(script, kit, data, tmp_path / "run", *extra, *(["--lmbda", "0.5"] if script is on_policy else []),
        student="student_nosys" if script is cross_tokenizer else "student")
    assert calls == [0]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(PREFLIGHT)]
    assert len(printed) == 1, printed


def test_the_preflight_changes_nothing_the_run_trains(kit, topk_cache, tmp_path, monkeypatch):
    """The same losses with and without the pre-flight (it runs without gradients, in eval mode, RNG put back)."""
    data, _ = topk_cache
    run(on_policy, kit, data, tmp_path / "with", "--lmbda", "0.5", "--max-new-tokens", "8")
    monkeypatch.setattr(training, "preflight", lambda loop, check: None)
    run(on_policy, kit, data, tmp_path / "without", "--lmbda", "0.5", "--max-new-tokens", "8")
    losses = {run: [m["loss"] for m in read_metrics(tmp_path / run)] for run in ("with", "without")}
    assert losses["with"] == losses["without"]


def test_the_preflight_runs_again_after_resume(kit, topk_cache, tmp_path, monkeypatch, capsys):
    data, _ = topk_cache
    out = tmp_path / "run"
    count_tokens = training.TrainLoop.count_tokens

    def stop_in_step_2(loop, batches):
        if loop.step_num == 1:
            raise KeyboardInterrupt
        return count_tokens(loop, batches)

    monkeypatch.setattr(training.TrainLoop, "count_tokens", stop_in_step_2)
    with pytest.raises(KeyboardInterrupt):
        run(token_level, kit, data, out, "--save-every", "1")
    monkeypatch.undo()
    capsys.readouterr()
    run(token_level, kit, data, out, "--save-every", "1", "--resume", str(out))
    printed = capsys.readouterr().out
    assert "resuming from" in printed and PREFLIGHT in printed
    assert printed.index(PREFLIGHT) > printed.index("resuming from")


def test_preflight_terms_names_the_side_that_is_not_finite():
    """Where the full distribution is not at hand, the objective's terms decide: ce reads only the student."""
    assert checks.preflight_terms({"ce": torch.tensor(2.0), "div": torch.tensor(0.5)}, 10) == {"ce": 2.0, "div": 0.5}
    with pytest.raises(common.DistillError, match="--student's logits are not finite"):
        checks.preflight_terms({"ce": torch.tensor(math.nan), "div": torch.tensor(math.nan)}, 10)
    with pytest.raises(common.DistillError, match="divergence from --teacher-cache is not finite"):
        checks.preflight_terms({"ce": torch.tensor(2.0), "div": torch.tensor(math.inf)}, 10, "--teacher-cache")
