"""token_level.py end to end on tiny models: the logged loss is the definition, the student moves toward the
teacher, padded heads are handled and different vocabularies refused."""

from __future__ import annotations

import shutil

import pytest
import torch

import common
import eval as evaluate
import models
import sequence_level
import token_level
from conftest import read_metrics, write_rows


def reference_loss(teacher_dir, student_dir, data, kind, temperature, beta=0.5, alpha=0.0):
    """alpha * CE + (1 - alpha) * T^2 * D over every completion token of `data`, in float64, written out from
    the formulas (not with common's loss functions)."""
    student, tok = models.load_model(str(student_dir))
    teacher, _ = models.load_model(str(teacher_dir))
    student, teacher = student.double(), teacher.double()
    rows = common.load_distill_rows(data)
    examples, _ = common.encode_rows(rows, tok, 1024)
    vocab = len(tok)
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            s_logits = student(ids).logits[0, :-1, :vocab]
            t_logits = teacher(ids).logits[0, :-1, :vocab]
        mask = torch.tensor(ex["loss_mask"][1:]).bool()
        targets = ids[0, 1:][mask]
        s_logits, t_logits = s_logits[mask], t_logits[mask]
        q = torch.exp(s_logits / temperature) / torch.exp(s_logits / temperature).sum(-1, keepdim=True)
        p = torch.exp(t_logits / temperature) / torch.exp(t_logits / temperature).sum(-1, keepdim=True)
        if kind == "forward":
            d = (p * (p.log() - q.log())).sum(-1)
        elif kind == "reverse":
            d = (q * (q.log() - p.log())).sum(-1)
        else:
            m = beta * p + (1 - beta) * q
            d = beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)
        q1 = torch.exp(s_logits) / torch.exp(s_logits).sum(-1, keepdim=True)
        ce = -q1.log().gather(1, targets[:, None]).squeeze(1)
        total += (alpha * ce + (1 - alpha) * temperature**2 * d).sum().item()
        count += int(mask.sum())
    return total / count


@pytest.mark.parametrize("kind,temperature,student,alpha", [
    ("forward", 1.0, "student", 0.0), ("forward", 2.0, "student", 0.0), ("reverse", 2.0, "student", 0.0),
    ("jsd", 2.0, "student", 0.0), ("forward", 2.0, "student_padded", 0.0), ("reverse", 1.0, "student", 0.3)])
def test_logged_step1_loss_is_the_definition(kit, trained_teacher, tmp_path, kind, temperature, student, alpha):
    data = write_rows(tmp_path / "d.jsonl", 6, seed=3)
    out = tmp_path / "run"
    token_level.main(["--teacher", str(trained_teacher), "--student", str(kit[student]), "--data", str(data),
                      "--output-dir", str(out), "--kl", kind, "--beta", "0.5", "--temperature", str(temperature),
                      "--alpha", str(alpha), "--lr", "0", "--max-steps", "1", "--batch-size", "8",
                      "--dtype", "float32"])
    logged = read_metrics(out)[0]["loss"]
    want = reference_loss(trained_teacher, kit[student], data, kind, temperature, alpha=alpha)
    assert logged == pytest.approx(want, rel=1e-5)
    if kind == "forward" and student == "student":
        other = reference_loss(trained_teacher, kit[student], data, kind, 3.0 - temperature)
        assert abs(other - want) > 1e-3 * want  # T=1 and T=2 are genuinely different numbers


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_student_moves_toward_the_teacher(kit, trained_teacher, tmp_path, kind):
    train = write_rows(tmp_path / "train.jsonl", 32, seed=4)
    heldout = common.load_distill_rows(write_rows(tmp_path / "heldout.jsonl", 12, seed=5))
    out = tmp_path / "run"
    token_level.main(["--teacher", str(trained_teacher), "--student", str(kit["student"]), "--data", str(train),
                      "--output-dir", str(out), "--kl", kind, "--temperature", "1.0", "--alpha", "0.1",
                      "--lr", "3e-3", "--max-steps", "40", "--batch-size", "8", "--log-every", "100"])
    metrics = read_metrics(out)
    assert sum(m["loss"] for m in metrics[-5:]) < 0.7 * sum(m["loss"] for m in metrics[:5])
    teacher, tok = models.load_model(str(trained_teacher))
    examples, _ = common.encode_rows(heldout, tok, 1024)
    before = evaluate.heldout_agreement(models.load_model(str(kit["student"]))[0], teacher, examples,
                                        tok.pad_token_id)
    after = evaluate.heldout_agreement(models.load_model(str(out))[0], teacher, examples, tok.pad_token_id)
    assert after["kl"] < 0.7 * before["kl"], (before, after)
    assert after["top1"] > before["top1"]


def test_teacher_equal_to_student_preflight_is_zero(kit, tmp_path, capsys):
    data = write_rows(tmp_path / "d.jsonl", 4)
    token_level.main(["--teacher", str(kit["student"]), "--student", str(kit["student"]), "--data", str(data),
                      "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--temperature", "2.0"])
    out = capsys.readouterr().out
    assert "KL(teacher||student) at T=2 = 0.0000, top-1 agreement = 100.0%" in out
    assert "warning" not in out


def test_different_vocabularies_are_refused(kit, trained_teacher, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 4)
    with pytest.raises(common.DistillError, match="vocabularies differ.*use cross_tokenizer.py"):
        token_level.main(["--teacher", str(trained_teacher), "--student", str(kit["student_llama3"]),
                          "--data", str(data), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"])


def test_template_mismatch_is_warned(kit, tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(kit["student"], student)
    template = (student / "chat_template.jinja").read_text()
    # Another header ("assistant:"), consistent between training text and generation prompt: a template that
    # differs from the teacher's but is right in itself (a self-inconsistent one is refused: test_doctor.py).
    changed = template.replace("+ '\\n' + message['content']", "+ ':\\n' + message['content']")
    changed = changed.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant:\\n'")
    assert changed.count(":\\n") == 2
    (student / "chat_template.jinja").write_text(changed)
    data = write_rows(tmp_path / "d.jsonl", 4)
    token_level.main(["--teacher", str(kit["teacher"]), "--student", str(student), "--data", str(data),
                      "--output-dir", str(tmp_path / "run"), "--max-steps", "1"])
    assert "warning: teacher and student chat templates differ" in capsys.readouterr().out


def test_a_template_whose_generation_prompt_is_not_the_training_prefix_is_refused(kit, tmp_path):
    """Training renders '<|im_start|>assistant:' while generation prompts with '<|im_start|>assistant': the student
    would answer, at inference, a context it never trained on. doctor.py's check, run by the training scripts."""
    student = tmp_path / "student"
    shutil.copytree(kit["student"], student)
    template = (student / "chat_template.jinja").read_text()
    (student / "chat_template.jinja").write_text(template.replace("+ '\\n' + message['content']",
                                                                  "+ ':\\n' + message['content']"))
    data = write_rows(tmp_path / "d.jsonl", 4)
    with pytest.raises(common.DistillError, match="generation prompt .* is not a prefix of the training text"):
        sequence_level.main(["--student", str(student), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                             "--max-steps", "1"])
    assert not (tmp_path / "run").exists()
