"""Non-finite values never pass silently: a model with one NaN weight, or a run whose weights blow up, stops with
one line naming the model (and the step), and nothing non-finite is ever written as a model or as data."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import cache_teacher
import common
import cross_tokenizer
import eval as evaluate
import generate_data
import models
import on_policy
import sequence_level
import token_level
from conftest import write_rows


@pytest.fixture(scope="module")
def nan_teacher(kit, tmp_path_factory):
    """The kit's teacher with a single NaN weight: every logit it produces is NaN."""
    folder = tmp_path_factory.mktemp("nan") / "teacher"
    shutil.copytree(kit["teacher"], folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(3)))
    return path


def saved_model(folder) -> bool:
    return (folder / "model.safetensors").exists() or (folder / "adapter_model.safetensors").exists()


def test_preflight_names_a_teacher_with_non_finite_logits(kit, nan_teacher, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(common.DistillError, match=r"--teacher.*not finite.*float32"):
        token_level.main(["--teacher", str(nan_teacher), "--student", str(kit["student"]), "--data",
                          str(write_rows(tmp_path / "d.jsonl", 4)), "--output-dir", str(out), "--max-steps", "2",
                          "--batch-size", "2"])
    assert not saved_model(out)


@pytest.mark.parametrize("script,student,message", [
    # on_policy's pre-flight runs the teacher on the first batch before any update, and names it
    (on_policy, "student", r"--teacher's logits are not finite .* on the first batch \(pre-flight\).*--teacher-dtype"),
    # cross_tokenizer's pre-flight: a finite student cross-entropy with a non-finite ULD term points at the teacher
    (cross_tokenizer, "student_nosys", r"divergence from --teacher is not finite on the first batch \(pre-flight\)")])
def test_a_nan_teacher_stops_training_at_the_first_step(kit, nan_teacher, tmp_path, script, student, message):
    out = tmp_path / "run"
    with pytest.raises(common.DistillError, match=message):
        script.main(["--teacher", str(nan_teacher), "--student", str(kit[student]), "--data",
                     str(write_rows(tmp_path / "d.jsonl", 4)), "--output-dir", str(out), "--max-steps", "2",
                     "--batch-size", "2", *(["--lmbda", "0"] if script is on_policy else [])])
    assert not saved_model(out)
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # the bad step is not logged as if it had happened


def test_a_nan_student_stops_at_the_first_step(nan_teacher, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(common.DistillError, match=r"step 1: --student's loss .*nan"):
        sequence_level.main(["--student", str(nan_teacher), "--data", str(write_rows(tmp_path / "d.jsonl", 4)),
                             "--output-dir", str(out), "--max-steps", "3", "--batch-size", "2"])
    assert not saved_model(out)


def test_weights_that_blow_up_are_never_saved(kit, tmp_path):
    """A step with a finite loss and gradient can still overflow the weights (float16 weights, a huge --lr): the
    final save refuses them rather than writing a model of infinities."""
    out = tmp_path / "run"
    with pytest.raises(common.DistillError, match=r"not saving.*--student.*not finite after step 1.*--lr"):
        sequence_level.main(["--student", str(kit["student"]), "--data", str(write_rows(tmp_path / "d.jsonl", 4)),
                             "--output-dir", str(out), "--max-steps", "1", "--batch-size", "2", "--lr", "1e5",
                             "--dtype", "float16"])
    assert not saved_model(out)


def test_generate_data_writes_nothing_from_a_nan_teacher(nan_teacher, prompts, tmp_path):
    out = tmp_path / "o.jsonl"
    with pytest.raises(common.DistillError, match=r"--teacher.*not finite.*token 1"):
        generate_data.main(["--teacher", str(nan_teacher), "--dataset", str(prompts), "--output", str(out),
                            "--max-new-tokens", "4", "--temperature", "0.7"])
    assert not out.exists() or out.read_text() == ""


@pytest.mark.parametrize("role", ["--model", "--teacher"])
def test_eval_names_the_model_with_non_finite_logits(kit, nan_teacher, prompts, tmp_path, role):
    models = {"--model": str(kit["student"]), "--teacher": str(kit["teacher"])}
    models[role] = str(nan_teacher)
    results = tmp_path / "results.jsonl"
    with pytest.raises(common.DistillError, match=rf"{role}.*not finite"):
        evaluate.main([*[x for pair in models.items() for x in pair], "--dataset", str(prompts), "--output",
                       str(results), "--max-new-tokens", "4"])
    assert not results.exists()


def test_held_out_kl_refuses_non_finite_teacher_logits(kit, nan_teacher):
    """The KL of eval.py (and the pre-flight) came out as 0.000 for a NaN teacher, since NaN > 0 is false."""
    student, tokenizer = models.load_model(str(kit["student"]))
    teacher, _ = models.load_model(str(nan_teacher))
    example = common.encode_chat(tokenizer, [{"role": "user", "content": "Q?"}], "#### 5")
    with pytest.raises(common.DistillError, match="teacher's logits are not finite"):
        evaluate.heldout_agreement(student, teacher, [example], tokenizer.pad_token_id)


@pytest.mark.parametrize("store", ["topk", "sampled"])
def test_cache_teacher_writes_no_shard_from_a_nan_teacher(nan_teacher, tmp_path, store):
    out = tmp_path / "cache"
    with pytest.raises(common.DistillError, match=r"--teacher.*not finite.*id=train-0"):
        cache_teacher.main(["--teacher", str(nan_teacher), "--data", str(write_rows(tmp_path / "d.jsonl", 3)),
                            "--output", str(out), "--top-k", "4", "--store", store])
    assert not list(out.glob("shard-*"))
