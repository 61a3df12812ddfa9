"""on_policy.py: masks on sampled completions, the lmbda mixture, repeatability, and agreement with token_level."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import pytest
import torch

import common
import generation
import models
import on_policy
import sequence_level
import served_teacher
import token_level
from conftest import read_metrics, write_rows

TIMING = ("elapsed_s", "gen_s", "teacher_s", "student_s")


def test_sampled_examples_mask_exactly_the_sampled_tokens():
    prompts = [[5, 6, 7], [5, 6], [9]]
    samples = [{"tokens": [11, 12, 99], "finished": True},   # ended with the stop token 99
               {"tokens": [13, 14, 15, 16], "finished": False},  # cut at max_new_tokens
               {"tokens": [99], "finished": True}]  # stopped at once
    examples = on_policy.sampled_examples(prompts, samples)
    assert examples[0] == {"input_ids": [5, 6, 7, 11, 12, 99], "loss_mask": [0, 0, 0, 1, 1, 1]}
    assert examples[1]["loss_mask"] == [0, 0, 1, 1, 1, 1]
    assert examples[2] == {"input_ids": [9, 99], "loss_mask": [0, 1]}
    batch = common.pad_batch(examples, pad_id=99)
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]]
    assert batch["attention_mask"][2].tolist() == [1, 1, 0, 0, 0, 0]


@pytest.fixture(scope="module")
def stopping_student(kit, tmp_path_factory):
    """A student that has learned to answer one prompt and stop (so samples end at different lengths)."""
    root = tmp_path_factory.mktemp("stopper")
    messages = [{"role": "user", "content": "Say hi."}]
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "messages": messages, "completion": "hi there"}) + "\n"
                            for i in range(4)))
    sequence_level.main(["--student", str(kit["student"]), "--data", str(data), "--output-dir", str(root / "m"),
                         "--max-steps", "80", "--batch-size", "4", "--lr", "1e-2", "--warmup-ratio", "0"])
    return root / "m", messages


def test_generation_stops_at_the_first_end_of_turn_or_is_cut(stopping_student):
    model_dir, messages = stopping_student
    model, tok = models.load_model(str(model_dir))
    stop = common.end_of_turn_ids(tok)
    prompt = tok(common.render_chat(tok, messages, add_generation_prompt=True), add_special_tokens=False)
    other = tok(common.render_chat(tok, [{"role": "user", "content": "Count the 17 cookies slowly."}],
                                   add_generation_prompt=True), add_special_tokens=False)
    done, cut = generation.generate(model, tok, [prompt["input_ids"], other["input_ids"]], max_new_tokens=12)
    assert done["finished"] and done["tokens"][-1] in stop and not set(done["tokens"][:-1]) & set(stop)
    assert tok.decode(done["tokens"][:-1]) == "hi there"
    short = generation.generate(model, tok, [prompt["input_ids"]], max_new_tokens=1)[0]
    assert not short["finished"] and len(short["tokens"]) == 1
    assert cut["finished"] or len(cut["tokens"]) == 12


def on_policy_args(kit, teacher, data, out, *extra):
    return ["--teacher", str(teacher), "--student", str(kit["student"]), "--data", str(data), "--output-dir",
            str(out), "--batch-size", "4", "--max-new-tokens", "16", "--log-every", "100", *extra]


def test_lmbda_zero_is_token_level_with_the_same_divergence(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 8)
    # --beta 1.0 alone: the deprecated spelling of --kl reverse
    for beta, kl, flags in ((1.0, "reverse", ["--beta", "1.0"]), (0.0, "forward", ["--kl", "forward"])):
        on_policy.main(on_policy_args(kit, kit["teacher"], data, tmp_path / f"op{beta}", "--lmbda", "0",
                                      *flags, "--lr", "0", "--max-steps", "1"))
        token_level.main(["--teacher", str(kit["teacher"]), "--student", str(kit["student"]), "--data", str(data),
                          "--output-dir", str(tmp_path / f"tl{beta}"), "--kl", kl, "--alpha", "0",
                          "--temperature", "1", "--batch-size", "4", "--lr", "0", "--max-steps", "1"])
        ours, theirs = read_metrics(tmp_path / f"op{beta}")[0], read_metrics(tmp_path / f"tl{beta}")[0]
        assert ours["on_policy"] is False
        assert ours["tokens"] == theirs["tokens"]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        assert ours["div"] == pytest.approx(theirs["div"], rel=1e-6)


def test_lmbda_one_never_reads_the_teachers_text(kit, tmp_path):
    data_a = write_rows(tmp_path / "a.jsonl", 8)
    rows = [json.loads(line) for line in data_a.read_text().splitlines()]
    for row in rows:
        row["completion"] = "completely different text #### 0"
    data_b = tmp_path / "b.jsonl"
    data_b.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged = []
    for data in (data_a, data_b):
        out = tmp_path / data.stem
        on_policy.main(on_policy_args(kit, kit["teacher"], data, out, "--lmbda", "1", "--max-steps", "3",
                                      "--lr", "1e-3"))
        logged.append([{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(out)])
    assert logged[0] == logged[1]
    assert all(m["on_policy"] for m in logged[0])


def test_runs_are_repeatable_resumable_and_the_mixture_is_recorded(kit, tmp_path):
    """Run b continues a copy of run a from its step-4 checkpoint: the coin flips, the samples and the losses of
    steps 5-8 must be a's (the coin's draws of skipped steps are replayed, the sampler's torch RNG restored)."""
    data = write_rows(tmp_path / "d.jsonl", 8)
    runs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / name
        flags = ["--lmbda", "0.5", "--max-steps", "8", "--lr", "1e-3", "--seed", seed, "--save-every", "4"]
        if name == "b":
            shutil.copytree(tmp_path / "a", out)
            flags += ["--resume", str(out / "checkpoint-4")]
        on_policy.main(on_policy_args(kit, kit["teacher"], data, out, *flags))
        runs.append([{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(out)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert len({m["on_policy"] for m in runs[0][4:]}) == 2  # the resumed steps hold both kinds
    kinds = [m["on_policy"] for m in runs[0]]
    assert any(kinds) and not all(kinds)
    for m in runs[0]:
        assert set(m) >= {"step", "loss", "lr", "tokens", "on_policy"}
        if m["on_policy"]:
            # Normalized by the tokens actually sampled (counted after generation): 4 samples, gen_len each.
            assert m["tokens"] == round(m["gen_len"] * 4)
            assert 0 <= m["cut_frac"] <= 1


def serve_without_a_server(monkeypatch) -> dict:
    """served_teacher.ServedTeacher answering without a server: at each scored position K=2 rows that favour the
    position's own token (so the loss depends on what was sampled); requests after `fail_after` fail as an
    unreachable server's do. Returns {"requests", "fail_after"}."""
    state = {"requests": 0, "fail_after": None}
    tail = math.log(1 - math.exp(-0.5) - math.exp(-1.5))

    def topk_rows(self, sequences, masks):
        state["requests"] += 1
        if state["fail_after"] is not None and state["requests"] > state["fail_after"]:
            raise common.DistillError(f"--teacher-url {self.url}: no answer after 1 tries (refused)")
        rows = []
        for seq, mask in zip(sequences, masks):
            tokens = torch.tensor([t for t, m in zip(seq[1:], mask[1:]) if m])
            rows.append({"topk_ids": torch.stack([tokens, (tokens + 1) % 256], 1),
                         "topk_logprobs": torch.tensor([-0.5, -1.5]).repeat(len(tokens), 1),
                         "tail_logmass": torch.full((len(tokens), 1), tail)})
        return rows

    monkeypatch.setattr(served_teacher.ServedTeacher, "topk_rows", topk_rows)
    monkeypatch.setattr(served_teacher.ServedTeacher, "check_tokenizer", lambda self, tokenizer: None)
    return state


def test_a_served_teacher_gone_mid_step_stops_and_resume_redoes_the_step_exactly(kit, tmp_path, monkeypatch):
    """--teacher-url: the server goes away in step 3, an on-policy step, after it sampled: the run stops with a
    checkpoint of step 2 holding the RNG as step 3 began (TrainLoop.step_rng), so --resume samples step 3 again as
    a run never stopped does, with the same losses. Off-policy steps send no request a step early (lmbda > 0)."""
    state = serve_without_a_server(monkeypatch)
    data = write_rows(tmp_path / "d.jsonl", 8)
    flags = ["--teacher-url", "http://teacher.invalid", "--teacher-top-k", "2", "--lmbda", "0.5", "--max-steps", "4",
             "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2", "--gen-temperature", "1.5"]
    on_policy.main(on_policy_args(kit, kit["teacher"], data, tmp_path / "whole", *flags))
    whole = [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(tmp_path / "whole")]
    assert [m["on_policy"] for m in whole] == [False, False, True, True]  # the seed's coin: step 3 samples
    assert state["requests"] == 1 + 4 * 2  # the pre-flight's batch, then each step's two micro-batches once
    state.update(requests=0, fail_after=5)  # the pre-flight and two steps answered, step 3's first request fails
    with pytest.raises(common.DistillError, match=r"stopped after step 2 of 4: saved .*checkpoint-2; --resume"):
        on_policy.main(on_policy_args(kit, kit["teacher"], data, tmp_path / "cut", *flags))
    state["fail_after"] = None
    on_policy.main(on_policy_args(kit, kit["teacher"], data, tmp_path / "cut", *flags, "--resume",
                                  str(tmp_path / "cut")))
    assert [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(tmp_path / "cut")] == whole


def test_pure_on_policy_from_an_untrained_student_stays_finite(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 8)
    out = tmp_path / "run"
    on_policy.main(on_policy_args(kit, kit["teacher"], data, out, "--lmbda", "1", "--max-steps", "4",
                                  "--lr", "1e-2", "--gen-temperature", "1.5"))
    metrics = read_metrics(out)
    assert all(math.isfinite(m["loss"]) and m["on_policy"] for m in metrics)
    assert all(0 <= m["cut_frac"] <= 1 and 1 <= m["gen_len"] <= 16 for m in metrics)
    assert torch.isfinite(torch.tensor([m["grad_norm"] for m in metrics])).all()


def test_vllm_flag_without_vllm_is_one_clear_error(kit, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    data = write_rows(tmp_path / "d.jsonl", 4)
    with pytest.raises(common.DistillError, match="--vllm needs the vllm package"):
        on_policy.main(on_policy_args(kit, kit["teacher"], data, tmp_path / "run", "--vllm", "--max-steps", "1"))


@pytest.mark.parametrize("name", ["student", "student_llama3", "student_nosys"])
def test_our_decode_loop_matches_transformers_generate_greedily(kit, name):
    from transformers import GenerationConfig

    model, tok = models.load_model(str(kit[name]))
    prompts = [tok(common.render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for q in ("Hi?", "What is 12 + 30, exactly?", "Ok")]
    ours = generation.generate(model, tok, prompts, max_new_tokens=12, stop_ids=[10**9])  # a stop that never comes
    batch = common.pad_batch([{"input_ids": p} for p in prompts], tok.pad_token_id, side="left")
    config = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    theirs = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            generation_config=config)[:, batch["input_ids"].shape[1]:]
    assert [r["tokens"] for r in ours] == theirs.tolist()
    assert not any(r["finished"] for r in ours)


@pytest.mark.parametrize("flags,kl,beta", [([], "reverse", None), (["--beta", "0"], "forward", None),
                                           (["--beta", "1"], "reverse", None), (["--beta", "0.3"], "jsd", 0.3),
                                           (["--kl", "jsd", "--beta", "0.3"], "jsd", 0.3),
                                           (["--kl", "forward"], "forward", None)])
def test_kl_flag_and_the_deprecated_bare_beta(flags, kl, beta, tmp_path, capsys):
    args = on_policy.parse_args(["--data", str(write_rows(tmp_path / "d.jsonl", 2)), *flags])
    assert args.kl == kl and common.divergence_beta(args) == {"forward": 0.0, "reverse": 1.0}.get(kl, beta)
    deprecated = "--beta" in flags and "--kl" not in flags
    assert ("deprecated" in capsys.readouterr().out) == deprecated
