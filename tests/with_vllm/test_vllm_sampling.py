"""--vllm executed: generate_data.py's completions from vLLM equal our own sampler's (greedy), and on_policy.py's
engine holds the student's current weights at every on-policy step (full and LoRA students)."""

from __future__ import annotations

import json

import pytest
import torch

import common
import generate_data
import generation
import on_policy
from conftest import write_rows as write_problem_rows


def test_generate_data_vllm_equals_our_sampler(vkit, tmp_path):
    write_problem_rows(tmp_path / "p.jsonl", 6)
    prompts = tmp_path / "prompts.jsonl"
    with prompts.open("w") as f:
        for line in (tmp_path / "p.jsonl").read_text().splitlines():
            f.write(json.dumps({"prompt": json.loads(line)["messages"][-1]["content"], "answer": "1"}) + "\n")
    base = ["--teacher", str(vkit["teacher"]), "--dataset", str(prompts), "--prompt-field", "prompt",
            "--answer-field", "answer", "--num-examples", "all", "--max-new-tokens", "24", "--batch-size", "3",
            "--dtype", "float32"]
    generate_data.main([*base, "--output", str(tmp_path / "ours.jsonl")])
    generate_data.main([*base, "--output", str(tmp_path / "vllm.jsonl"), "--vllm", "--vllm-eager"])
    ours = common.read_jsonl(tmp_path / "ours.jsonl")
    theirs = common.read_jsonl(tmp_path / "vllm.jsonl")
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        assert (a["id"], a["completion"], a["finish_reason"]) == (b["id"], b["completion"], b["finish_reason"])
    assert len({r["completion"] for r in ours}) > 1  # not one degenerate answer for every prompt


def model_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """log p(prompt[t] | prompt[:t]) for t >= 1 from a Hugging Face model, float64."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, :-1].double()
    model.train(was_training)
    return logits.log_softmax(-1).gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_on_policy_vllm_samples_from_the_current_student(vkit, tmp_path, monkeypatch, lora):
    """After every push the engine's log-probabilities of a fixed prompt equal the student's at that moment, and
    they move between pushes (so a push that did nothing would fail the test)."""
    prompt = [5, 17, 42, 99, 7, 300, 12, 8, 64, 250]
    seen = []

    class Recording(generation.VLLMSampler):
        def load_weights(self, model):
            super().load_weights(model)
            engine = self.prompt_logprobs(prompt, k=1)
            engine = torch.tensor([pos[tok] for pos, tok in zip(engine[1:], prompt[1:])], dtype=torch.float64)
            seen.append((engine, model_logprobs(model, prompt)))

    monkeypatch.setattr(generation, "VLLMSampler", Recording)
    data = write_problem_rows(tmp_path / "d.jsonl", 8)
    args = ["--student", str(vkit["student"]), "--teacher", str(vkit["teacher"]), "--data", str(data),
            "--output-dir", str(tmp_path / "run"), "--lmbda", "1", "--max-steps", "3", "--batch-size", "2",
            "--lr", "5e-3", "--max-new-tokens", "12", "--vllm", "--vllm-eager", "--log-every", "100",
            "--dtype", "float32", "--teacher-dtype", "float32"]
    if lora:
        args += ["--lora", "--lora-r", "4", "--lora-dropout", "0"]
    on_policy.main(args)
    assert len(seen) == 3
    for engine, trained in seen:
        assert torch.allclose(engine, trained, atol=1e-4), (engine - trained).abs().max()
    assert (seen[-1][1] - seen[0][1]).abs().max() > 1e-3  # the student did change between the pushes
