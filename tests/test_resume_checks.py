"""Resume and re-run check what they continue: a checkpoint is continued only with the data, models and loss it was
trained with (a changed schedule is applied, reported and recorded); generate_data.py and cache_teacher.py never
add rows from another teacher or other settings to an output; a cached teacher row is used only for the row it
was scored on."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import cache_teacher
import common
import cross_tokenizer
import generate_data
import models
import sequence_level
import token_level
from conftest import read_metrics, write_rows


@pytest.fixture(scope="module")
def base_run(kit, tmp_path_factory):
    """A 4-step sequence_level run with checkpoints at steps 2 and 3, and its data."""
    root = tmp_path_factory.mktemp("base")
    data = write_rows(root / "d.jsonl", 16)
    argv = ["--student", str(kit["student"]), "--data", str(data), "--max-steps", "4", "--batch-size", "4",
            "--lr", "3e-3", "--warmup-ratio", "0", "--save-every", "2", "--log-every", "100"]
    sequence_level.main([*argv, "--output-dir", str(root / "run")])
    return root, data, argv


def resumed_copy(base_run, tmp_path):
    root, _, _ = base_run
    shutil.copytree(root / "run", tmp_path / "run")
    return tmp_path / "run"


def test_resume_refuses_other_data_or_batch_layout_and_writes_nothing(base_run, tmp_path):
    _, data, argv = base_run
    run = resumed_copy(base_run, tmp_path)
    config = (run / "run_config.json").read_text()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[3]["completion"] += " Checked."
    other = tmp_path / "d.jsonl"  # a new path; what counts is the content
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(common.DistillError, match=r"train something else .*--data content"):
        sequence_level.main([*argv, "--data", str(other), "--output-dir", str(run), "--resume", str(run)])
    with pytest.raises(common.DistillError, match=r"--batch-size 2 \(checkpoint: 4\)"):
        sequence_level.main([*argv, "--batch-size", "2", "--output-dir", str(run), "--resume", str(run)])
    assert (run / "run_config.json").read_text() == config


def test_resume_applies_a_new_lr_and_records_it(base_run, tmp_path, capsys):
    root, _, argv = base_run
    run = resumed_copy(base_run, tmp_path)
    sequence_level.main([*argv, "--lr", "1e-3", "--output-dir", str(run), "--resume", str(run / "checkpoint-2")])
    assert "--lr 0.001 (checkpoint: 0.003)" in capsys.readouterr().out
    full, resumed = read_metrics(root / "run"), read_metrics(run)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for before, after in zip(full[2:], resumed[2:]):  # steps 3 and 4 follow the same schedule at a third of the peak
        assert after["lr"] == pytest.approx(before["lr"] / 3, rel=1e-9)
    config = json.loads((run / "run_config.json").read_text())
    assert config["lr"] == 1e-3
    assert config["resume_history"][0]["step"] == 2
    assert "--lr 0.001 (checkpoint: 0.003)" in config["resume_history"][0]["changed"]


def perturbed_copy(model_dir, out):
    """The same model with other weights (a fine-tune of it, as far as a fingerprint can tell)."""
    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_token_level_resume_refuses_another_teacher_or_loss(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 8)
    argv = ["--student", str(kit["student"]), "--data", str(data), "--max-steps", "2", "--batch-size", "4",
            "--save-every", "1", "--output-dir", str(tmp_path / "run"), "--kl", "reverse"]
    token_level.main([*argv, "--teacher", str(kit["teacher"])])
    resume = ["--resume", str(tmp_path / "run")]
    with pytest.raises(common.DistillError, match=r"--kl forward \(checkpoint: reverse\)"):
        token_level.main([*argv, "--teacher", str(kit["teacher"]), *resume, "--kl", "forward"])
    other = perturbed_copy(kit["teacher"], tmp_path / "other_teacher")
    with pytest.raises(common.DistillError, match="--teacher weights/tokenizer"):
        token_level.main([*argv, "--teacher", str(other), *resume])


def gen(kit, prompts, out, *extra, teacher=None):
    generate_data.main(["--teacher", str(teacher or kit["teacher"]), "--dataset", str(prompts), "--output",
                        str(out), "--max-new-tokens", "4", "--temperature", "0", "--batch-size", "4", *extra])


def test_generate_data_never_appends_rows_of_another_teacher_or_settings(kit, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"What is {i} + 2?", "answer": f"#### {i + 2}"}) + "\n"
                               for i in range(4)))
    out = tmp_path / "out.jsonl"
    gen(kit, prompts, out, "--num-examples", "2")
    before = out.read_bytes()
    other = perturbed_copy(kit["teacher"], tmp_path / "other_teacher")
    with pytest.raises(common.DistillError, match="other weights"):
        gen(kit, prompts, out, teacher=other)
    with pytest.raises(common.DistillError, match=r"--max-new-tokens 6 \(file: 4\)"):
        gen(kit, prompts, out, "--max-new-tokens", "6")
    assert out.read_bytes() == before
    gen(kit, prompts, out, "--seed", "5")  # the same distribution: more rows are fine
    assert len(out.read_text().splitlines()) == 4


def cache_args(kit, data, out, teacher=None):
    return ["--teacher", str(teacher or kit["teacher"]), "--data", str(data), "--output", str(out), "--top-k", "8"]


def test_cache_teacher_refuses_another_teacher_or_another_row_under_a_cached_id(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 4)
    cache = tmp_path / "cache"
    cache_teacher.main(cache_args(kit, data, cache))
    other = perturbed_copy(kit["teacher"], tmp_path / "other_teacher")
    with pytest.raises(common.DistillError, match="teacher_fingerprint"):
        cache_teacher.main(cache_args(kit, data, cache, teacher=other))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[1]["messages"][-1]["content"] += " Explain."
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(common.DistillError, match=r"1 cached rows \(e.g. id train-1\) were scored on another"):
        cache_teacher.main(cache_args(kit, changed, cache))


def test_cached_rows_of_another_prompt_are_skipped_and_counted(kit, tmp_path, capsys):
    data = write_rows(tmp_path / "d.jsonl", 8)
    cache_teacher.main(cache_args(kit, data, tmp_path / "cache"))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for row in rows[:3]:  # same ids and completions, other questions: the cached rows do not apply
        row["messages"][-1]["content"] = row["messages"][-1]["content"].replace("?", "? Answer quickly.")
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    token_level.main(["--student", str(kit["student"]), "--data", str(changed), "--teacher-cache",
                      str(tmp_path / "cache"), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"])
    assert "0 rows absent from the cache and 3 whose prompt, completion or tokens differ" in capsys.readouterr().out

    _, cached = cache_teacher.load_cache(tmp_path / "cache")
    tokenizer = models.load_tokenizer(str(kit["student"]))
    examples, _, _ = cross_tokenizer.encode_from_cache(common.load_distill_rows(changed), tokenizer, cached, 1024)
    assert len(examples) == 5
    with pytest.raises(common.DistillError, match="3 were cached for another prompt"):
        cross_tokenizer.encode_from_cache(common.load_distill_rows(changed), tokenizer, cached, 1024, held_out=True)
    assert torch.is_tensor(examples[0]["teacher_positions"]) and "topk_logprobs" in examples[0]["teacher_row"]
