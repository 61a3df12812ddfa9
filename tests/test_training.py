"""Training end to end on tiny models: gradient accumulation, sequence_level, the shared loop's conventions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import common
import generation
import losses
import models
import sequence_level
from conftest import ROOT, read_metrics, write_rows


def micro_batch_grads(model, examples, pad_id, split, normalize_globally=True):
    """Gradients of the CE loss over `examples` cut into micro-batches of `split` examples."""
    model.zero_grad()
    batches = [common.pad_batch(examples[i:i + split], pad_id) for i in range(0, len(examples), split)]
    total = sum(b["loss_mask"][:, 1:].sum().item() for b in batches)
    head = models.output_head(model)
    for batch in batches:
        hidden = models.student_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        student_hidden, targets = common.shift_for_next_token(hidden, batch)
        num_tokens = total if normalize_globally else len(targets) * len(batches)
        loss, _, _ = losses.fused_head_loss(student_hidden, head.weight, targets, num_tokens, chunk_size=16)
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_equals_one_big_batch(kit, tmp_path):
    model, tok = models.load_model(str(kit["student"]), dtype="float32")
    model = model.double()
    rows = common.load_distill_rows(write_rows(tmp_path / "d.jsonl", 8))
    # Unequal completion lengths so the micro-batches hold different numbers of masked tokens.
    for i, row in enumerate(rows):
        row["completion"] = row["completion"] + " extra words" * (3 * i)
    examples, _ = common.encode_rows(rows, tok, 1024)
    counts = [sum(ex["loss_mask"]) for ex in examples]
    assert len(set(counts[0:2] and [sum(counts[i:i + 2]) for i in range(0, 8, 2)])) == 4
    one = micro_batch_grads(model, examples, tok.pad_token_id, split=8)
    accumulated = micro_batch_grads(model, examples, tok.pad_token_id, split=2)
    for name in one:
        torch.testing.assert_close(accumulated[name], one[name], rtol=1e-9, atol=1e-12)
    # The naive per-micro-batch mean is measurably different: the test can tell the two apart.
    naive = micro_batch_grads(model, examples, tok.pad_token_id, split=2, normalize_globally=False)
    assert max((naive[n] - one[n]).abs().max().item() for n in one) > 1e-4


def test_accumulated_run_logs_the_same_step(kit, tmp_path):
    """Through the script: batch 8 x 1 and batch 2 x 4 log the same step-1 loss, tokens and gradient norm."""
    data = write_rows(tmp_path / "d.jsonl", 8)
    logged = []
    for batch, accum in ((8, 1), (2, 4)):
        out = tmp_path / f"run_{batch}x{accum}"
        sequence_level.main(["--student", str(kit["student"]), "--data", str(data), "--output-dir", str(out),
                             "--batch-size", str(batch), "--grad-accum", str(accum), "--max-steps", "1",
                             "--dtype", "float32"])
        logged.append(read_metrics(out)[0])
    a, b = logged
    assert a["tokens"] == b["tokens"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_sequence_level_learns_saves_and_reloads(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 16)
    out = tmp_path / "run"
    sequence_level.main(["--student", str(kit["student"]), "--data", str(data), "--output-dir", str(out),
                         "--max-steps", "30", "--batch-size", "4", "--lr", "3e-3", "--log-every", "100"])
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert set(metrics[0]) >= {"step", "loss", "lr", "tokens", "elapsed_s"}
    first, last = sum(m["loss"] for m in metrics[:3]) / 3, sum(m["loss"] for m in metrics[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.vocab_size == AutoModelForCausalLM.from_pretrained(kit["student"]).config.vocab_size


@pytest.mark.parametrize("student", ["student", "student_nosys"])
def test_student_reproduces_one_fixed_teacher_answer(kit, tmp_path, student):
    answer = "First 4 + 5 = 9.\nThen 9 - 2 = 7.\n#### 7"
    messages = [{"role": "user", "content": "Tom has 4 apples, gets 5, eats 2. How many?"}]
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "messages": messages, "completion": answer}) + "\n"
                            for i in range(4)))
    out = tmp_path / "run"
    sequence_level.main(["--student", str(kit[student]), "--data", str(data), "--output-dir", str(out),
                         "--max-steps", "150", "--batch-size", "4", "--lr", "1e-2", "--warmup-ratio", "0",
                         "--log-every", "100"])
    model, tok = models.load_model(str(out))
    prompt = tok(common.render_chat(tok, messages, add_generation_prompt=True), add_special_tokens=False)
    result = generation.generate(model, tok, [prompt["input_ids"]], max_new_tokens=40)[0]
    assert result["finished"], "the student must have learned to emit the end-of-turn token"
    assert tok.decode(result["tokens"][:-1], skip_special_tokens=True).strip() == answer


def test_lora_trains_only_the_adapter(kit, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    trained = {}
    wrap = models.maybe_lora

    def spy(model, args):  # keep the very model the loop trains, to inspect it afterwards
        trained["model"] = wrap(model, args)
        return trained["model"]

    monkeypatch.setattr(models, "maybe_lora", spy)
    data = write_rows(tmp_path / "d.jsonl", 8)
    out = tmp_path / "lora"
    sequence_level.main(["--student", str(kit["student"]), "--data", str(data), "--output-dir", str(out),
                         "--max-steps", "3", "--lora", "--lora-r", "4", "--lr", "1e-3"])
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    # The adapter was trained: peft initializes lora_B to zero, so a non-zero lora_B means updates reached it.
    lora_b = [v for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
    # ...and nothing else was: after 3 optimizer steps every base weight of the trained model is the original.
    original = load_file(kit["student"] / "model.safetensors")
    checked = 0
    for name, param in trained["model"].get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param.detach().cpu(), original[name.replace("base_layer.", "")]), name
            checked += 1
    assert checked == len(original)


def test_bf16_autocast_and_gradient_checkpointing_run(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 8)
    out = tmp_path / "bf16"
    # A process of its own: accelerate's mixed-precision state is a process-wide singleton.
    subprocess.run([sys.executable, str(ROOT / "sequence_level.py"), "--student", str(kit["student"]), "--data",
                    str(data), "--output-dir", str(out), "--max-steps", "3", "--bf16", "--gradient-checkpointing",
                    "--lr", "1e-3"], check=True, capture_output=True)
    metrics = read_metrics(out)
    assert len(metrics) == 3 and all(m["loss"] == m["loss"] for m in metrics)  # no NaN


def test_report_to_tensorboard_logs_the_metrics_rows(kit, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_rows(tmp_path / "d.jsonl", 8)
    out = tmp_path / "tb"
    sequence_level.main(["--student", str(kit["student"]), "--data", str(data), "--output-dir", str(out),
                         "--max-steps", "3", "--lr", "1e-3", "--report-to", "tensorboard"])
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file under OUTPUT_DIR/runs"
    scalars = {}
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    metrics = read_metrics(out)
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3]
    assert [value for _, value in scalars["loss"]] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert {"lr", "tokens", "grad_norm", "elapsed_s"} <= scalars.keys()


def test_plot_metrics_draws_several_runs(tmp_path):
    import plot_metrics

    for name, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "loss": scale / s, "kl": 0.5 / s} if name == "a" else {"step": s, "loss": scale / s}
                for s in range(1, 11)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_metrics.main([str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl"), "--keys", "loss", "kl",
                             "--smooth", "3", "--out", str(tmp_path / "curves.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    with pytest.raises(common.DistillError, match="no run logs it"):
        plot_metrics.main([str(tmp_path / "b"), "--keys", "kl", "--out", str(tmp_path / "x.png")])
    with pytest.raises(common.DistillError, match="no metrics.jsonl"):
        plot_metrics.main([str(tmp_path / "missing")])


@pytest.mark.parametrize("lora", [True, False])
def test_a_lora_adapter_as_student_is_refused_and_its_merge_command_works(kit, tmp_path, lora):
    """A --lora run's output passed as --student (SFT, then on-policy from it): transformers loads it as the base
    with the adapter attached, and a new run would save weights that name only the base. One line refuses it, with
    the command that merges it; the merged folder then trains and starts from what the adapter learned."""
    pytest.importorskip("peft")
    data = write_rows(tmp_path / "d.jsonl", 8)
    stage1 = tmp_path / "stage1"
    sequence_level.main(["--student", str(kit["student"]), "--data", str(data), "--output-dir", str(stage1),
                         "--max-steps", "3", "--lora", "--lora-r", "4", "--lr", "1e-2"])
    argv = ["--data", str(data), "--output-dir", str(tmp_path / "stage2"), "--max-steps", "1",
            *(["--lora", "--lora-r", "4"] if lora else [])]
    with pytest.raises(common.DistillError, match=r"--student '.*stage1' is a LoRA adapter .* Merge it") as refused:
        sequence_level.main(["--student", str(stage1), *argv])
    assert not (tmp_path / "stage2" / "model.safetensors").exists()
    command = str(refused.value).split('python -c "')[1].rstrip('"')
    # The shell passes it through its double quotes unchanged (nothing it would expand or end the string at), so
    # running the code here is running the command, less an interpreter start.
    assert not set('"$`\\') & set(command), command
    exec(compile(command, "<the merge command>", "exec"), {})
    merged = Path(f"{stage1}_merged")
    adapted, _ = models.load_model(str(stage1))  # base + adapter, as transformers attaches it
    plain, _ = models.load_model(str(merged))
    ids = torch.tensor([[5, 6, 7, 8]])
    base, _ = models.load_model(str(kit["student"]))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain(ids).logits, base(ids).logits, atol=1e-4)  # the adapter had learned
    sequence_level.main(["--student", str(merged), *argv])
