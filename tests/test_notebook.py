"""The interactive explainer: explain_demo.method_targets against the formulas written out in float64, its real
positions against direct forward passes, and notebooks/explainer.py exported headless (marimo's HTML export) on a
demo-like folder built from the tiny kit: every panel is in the page; without a demo, one line naming `make demo`."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import explain_demo
import models
from conftest import write_rows
from reference import kl64, ref_divergence, softmax64

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_method_targets_against_the_formulas(beta, temperature):
    gen = torch.Generator().manual_seed(int(10 * beta + temperature))
    t, s, st, ss = (torch.randn(7, generator=gen, dtype=torch.float64) * 2 for _ in range(4))
    cross = torch.randn(9, generator=gen, dtype=torch.float64) * 2
    target, lmbda, alpha, top_k = 3, 0.25, 0.1, 4
    got = explain_demo.method_targets(t, s, target, temperature=temperature, beta=beta, top_k=top_k, lmbda=lmbda,
                                      alpha=alpha, sample_teacher_logits=st, sample_student_logits=ss,
                                      cross_student_logits=cross, cross_target=5, cross_alpha=0.5)
    tl, sl = t.tolist(), s.tolist()
    ce = -math.log(softmax64(sl, 1.0)[target])
    seq = got["sequence-level"]
    assert seq["target"].tolist() == [1.0 if i == target else 0.0 for i in range(7)]
    assert seq["loss"] == pytest.approx(ce, rel=1e-12)
    off = ref_divergence(sl, tl, beta, temperature)
    token = got["token-level"]
    assert token["target"].tolist() == pytest.approx(softmax64(tl, temperature), abs=1e-12)
    assert token["student"].tolist() == pytest.approx(softmax64(sl, temperature), abs=1e-12)
    assert token["loss"] == pytest.approx(alpha * ce + (1 - alpha) * off, rel=1e-10)
    on = ref_divergence(ss.tolist(), st.tolist(), beta, temperature)
    policy = got["on-policy"]
    assert policy["target"].tolist() == pytest.approx(softmax64(st.tolist(), temperature), abs=1e-12)
    assert policy["loss"] == pytest.approx(lmbda * on + (1 - lmbda) * off, rel=1e-10)
    # ULD: both distributions sorted, the top 4 kept and the rest summed into one tail bucket
    p = sorted(softmax64(tl, temperature), reverse=True)
    q = sorted(softmax64(cross.tolist(), temperature), reverse=True)
    p, q = p[:top_k] + [sum(p[top_k:])], q[:top_k] + [sum(q[top_k:])]
    uld = got["cross-tokenizer (ULD)"]
    assert uld["target"].tolist() == pytest.approx(p, abs=1e-12) and uld["top_k"] == top_k
    assert uld["uld"] == pytest.approx(temperature**2 * kl64(p, q), rel=1e-10)
    cross_ce = -math.log(softmax64(cross.tolist(), 1.0)[5])
    assert uld["loss"] == pytest.approx(0.5 * cross_ce + 0.5 * uld["uld"], rel=1e-10)
    assert explain_demo.kl_beta("forward", 0.3) == 0.0 and explain_demo.kl_beta("reverse", 0.3) == 1.0
    assert explain_demo.kl_beta("jsd", 0.3) == 0.3


@pytest.fixture(scope="module")
def demo(kit, tmp_path_factory):
    """A folder laid out as demo.py's OUT/full, from the kit's models, with made-up metrics.jsonl curves."""
    folder = tmp_path_factory.mktemp("demo") / "full"
    folder.mkdir()
    shutil.copytree(kit["teacher"], folder / "teacher_round0")
    # demo.py records the path it was run with; the explainer also finds the teacher inside the folder
    (folder / "teacher_final.json").write_text(json.dumps({"path": "elsewhere/teacher_round0", "exact_match": 1}))
    for name, source in (("student_base", "student"), ("sequence_level", "student"), ("token_level", "student_padded"),
                         ("on_policy", "student_padded"), ("student_other_tokenizer_base", "student_nosys"),
                         ("cross_tokenizer", "student_nosys")):
        shutil.copytree(kit[source], folder / name)
    for n, name in enumerate(("sequence_level", "token_level", "on_policy", "cross_tokenizer")):
        with (folder / name / "metrics.jsonl").open("w") as f:
            for step in range(1, 11):
                f.write(json.dumps({"step": step, "loss": 3.0 / (step + n)}) + "\n")
                if step % 5 == 0:
                    f.write(json.dumps({"step": step, "eval_loss": 2.0 / (step + n), "eval_exact_match": step / 10})
                            + "\n")
    write_rows(folder / "dev_teacher_data.jsonl", 3, seed=5)
    return folder


@pytest.fixture(scope="module")
def positions(demo):
    return explain_demo.explainer_positions(demo, max_new_tokens=12)


def test_explainer_positions_are_the_models_logits(kit, demo, positions):
    assert explain_demo.find_demo(demo.parent) == demo and explain_demo.find_demo(demo.parent / "nothing") is None
    row = common.load_distill_rows(demo / "dev_teacher_data.jsonl")[0]
    teacher, tokenizer = models.load_model(str(kit["teacher"]))
    padded, _ = models.load_model(str(kit["student_padded"]))
    enc = common.encode_chat(tokenizer, row["messages"], row["completion"])
    completion = [i for i, m in enumerate(enc["loss_mask"]) if m]
    with torch.no_grad():
        t_logits = teacher(input_ids=torch.tensor([enc["input_ids"]])).logits[0]
        s_logits = padded(input_ids=torch.tensor([enc["input_ids"]])).logits[0, :, :len(tokenizer)]
    assert positions["targets"] == [enc["input_ids"][i] for i in completion]
    assert torch.allclose(positions["teacher"], t_logits[[i - 1 for i in completion]], atol=1e-4)
    assert torch.allclose(positions["students"]["token-level"], s_logits[[i - 1 for i in completion]], atol=1e-4)
    # the on-policy sample: the student's own tokens after the prompt, the teacher's logits along them
    sample = positions["samples"]["on-policy"]
    assert 1 <= len(sample["tokens"]) <= 12 and sample["teacher"].shape[0] == len(sample["tokens"])
    # the other-tokenizer student's logits at its token aligned to each teacher token
    cross = positions["cross"]
    assert len(cross["targets"]) == len(completion) and cross["cross-tokenizer (ULD)"].shape[0] == len(completion)
    hands = explain_demo.explainer_hands(positions, 2, temperature=2.0, beta=0.0, top_k=5, lmbda=0.5)
    want = explain_demo.method_targets(positions["teacher"][2], positions["students"]["token-level"][2],
                                       positions["targets"][2], temperature=2.0, beta=0.0, top_k=5, lmbda=0.5)
    assert hands["token-level"]["loss"] == pytest.approx(want["token-level"]["loss"])


def export(tmp_path, *args) -> str:
    # Looked up, not imported: marimo in this process makes transformers believe it runs in a notebook, after which
    # importing its Trainer (trl's reference losses, tests/test_losses.py) fails on the missing IPython.
    if importlib.util.find_spec("marimo") is None:
        pytest.skip("marimo is not installed (requirements-dev.txt)")
    out = tmp_path / "explainer.html"
    subprocess.run([sys.executable, "-m", "marimo", "export", "html", str(ROOT / "notebooks" / "explainer.py"),
                    "-o", str(out), "--no-include-code", "--", *args], check=True, capture_output=True, timeout=300)
    # the outputs sit in the page as JSON-escaped HTML
    return out.read_text(encoding="utf-8").replace("\\u003C", "<").replace("\\u003E", ">")


def test_notebook_exports_every_panel(demo, positions, tmp_path):
    page = export(tmp_path, "--demo", str(demo.parent))
    for heading in ("What each distillation method hands the student", "What each method hands the student",
                    "Training and held-out curves"):
        assert heading in page, heading
    for method in ("sequence-level", "token-level", "on-policy", "cross-tokenizer (ULD)"):
        assert f"<td>{method}</td>" in page, method
    assert page.count("data:image/png;base64") == 2  # the four methods' figure and the curves
    # the losses shown are those at the sliders' starting values (position: where the teacher is least sure)
    hands = explain_demo.explainer_hands(positions, int(positions["entropy"].argmax()), temperature=2.0, beta=0.0,
                                         top_k=20, lmbda=0.5)
    for label in ("sequence-level", "token-level", "cross-tokenizer (ULD)"):
        assert f"{hands[label]['loss']:.3f} " in page or f"{hands[label]['loss']:.3f}<" in page, label
    assert "No demo output here" not in page


def test_notebook_without_a_demo_says_which_command_makes_one(tmp_path):
    page = export(tmp_path, "--demo", str(tmp_path / "nowhere"))
    assert "No demo output here" in page and "make demo" in page
    assert "What each method hands the student" not in page and "data:image/png" not in page
