"""Training steps and decoding at real model shapes with random weights: the step half of bench/gpu_check.sh.

    python bench/bench_gpu_steps.py build --work /tmp/gc            # Qwen2.5-0.5B/1.5B-shaped models, tokenizer, data
    python bench/bench_gpu_steps.py train --work /tmp/gc --script token_level   # 10 steps of token_level.py
    python bench/bench_gpu_steps.py train --work /tmp/gc --script on_policy     # 10 on-policy steps
    python bench/bench_gpu_steps.py decode --work /tmp/gc   # generation.generate vs model.generate (8x128, 64x256)
    python bench/bench_gpu_steps.py vllm --work /tmp/gc             # vLLM on the same prompts, when installed
    python bench/bench_gpu_steps.py build --work /tmp/t --student-shape tiny-student --teacher-shape tiny-teacher
                                                                    # seconds on CPU (gpu_check.sh --cpu)

There is no hub access where this runs, so `build` makes the models from `transformers.Qwen2Config` at the real
shapes (Qwen2.5-0.5B: 896 wide, 24 layers, 14 heads, 2 KV heads, MLP 4864; Qwen2.5-1.5B: 1536, 28, 12, 2, 8960;
both 151,936 head rows, tied embeddings) and a local byte-level tokenizer (tiny.build_tokenizer) padded with
unreachable filler tokens to Qwen2.5's 151,665, so that the scripts' shared vocabulary, and with it every loss,
softmax and sampling step, is as wide as a real run's. Weights are saved in bf16 like the hub checkpoints.

`train` runs the script's own main() on that folder, unchanged, with the flags of a bf16 GPU run (--bf16
--teacher-dtype bfloat16: float32 student weights under bf16 autocast, bf16 teacher). It only wraps, with
torch.cuda.synchronize() on either side, the functions whose time it reports: models.teacher_hidden_states (the
teacher's forward), generation.generate (on-policy sampling) and TrainLoop.step (clipping, AdamW, logging); the
step time runs from the end of one TrainLoop.step to the end of the next, and the student's forward, loss and
backward (with batching) are the rest of it. The first step (kernel selection, the pre-flight check) is reported
apart. TrainLoop.save is skipped: writing random weights would time the disk. Peak memory is
torch.cuda.max_memory_allocated over the whole run (peak RSS on CPU).

`decode` times generation.generate, the decode loop on-policy sampling uses, against model.generate on the same
left-padded prompts, greedy, both producing exactly --new-tokens per row (no stop token: a random model rarely
emits one, and equal work makes tokens/s comparable), at each --batch x --new-tokens shape (default 8 x 128 and
64 x 256); median of --reps after a warm-up each: a short one for model.generate, one at the timed shape for ours,
whose first call at a shape captures the CUDA graph it replays later (that first call's time is printed too).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import random
import resource
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name -> Qwen2Config sizes, head rows and the family's tokenizer length.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, rows=151936, tokens=151665),
    "qwen2.5-1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, rows=151936, tokens=151665),
    # for the CPU smoke run: same code, seconds
    "tiny-student": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, rows=640, tokens=600),
    "tiny-teacher": dict(hidden=96, layers=3, heads=4, kv_heads=2, intermediate=192, rows=640, tokens=600),
}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 1e9:.2f} GB max_memory_allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.2f} GB peak RSS"


# ----------------------------------------------------------------------------------------------------------------
# build


def padded_tokenizer(n_tokens: int):
    """The tiny chatml tokenizer grown to `n_tokens` with filler entries no merge can produce, its three special
    tokens moved to the end as in Qwen2.5 (<|endoftext|>, <|im_start|>, <|im_end|> last)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    import tiny

    base = tiny.build_tokenizer("chatml")
    if n_tokens < len(base):
        raise SystemExit(f"--vocab-tokens {n_tokens} is smaller than the trained tokenizer ({len(base)})")
    data = json.loads(base.backend_tokenizer.to_str())
    vocab, specials = data["model"]["vocab"], data["added_tokens"]
    first = len(vocab)
    for i in range(n_tokens - len(base)):
        vocab[f"<|filler_{i}|>"] = first + i
    for j, special in enumerate(specials):
        special["id"] = n_tokens - len(specials) + j
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                   chat_template=base.chat_template, model_max_length=32768,
                                   clean_up_tokenization_spaces=False, bos_token=None, eos_token=base.eos_token,
                                   unk_token=None, pad_token=base.pad_token)


def build_model(shape: dict, tokenizer, device: str, seed: int):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    import tiny

    config = Qwen2Config(vocab_size=shape["rows"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], max_position_embeddings=32768,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it is made: 1.5 B float32 draws take a CPU most of a minute
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(eos_token_id=tiny.end_token_ids(tokenizer),
                                               pad_token_id=tokenizer.pad_token_id)
    return model


def write_data(path: Path, tokenizer, rows: int, completion_tokens: int) -> float:
    """GSM8K-style rows whose completions are worked solutions strung together up to `completion_tokens`;
    returns the mean completion length in tokens."""
    import common
    import tiny

    rng = random.Random(0)
    lengths = []
    with path.open("w") as f:
        for i in range(rows):
            question, solution, _ = tiny.make_problem(rng)
            parts = [solution]
            while (n := len(tokenizer("\n\n".join(parts))["input_ids"])) < completion_tokens:
                parts.append(tiny.make_problem(rng)[1])
            lengths.append(n)
            messages = [{"role": "system", "content": common.DEFAULT_SYSTEM_PROMPT},
                        {"role": "user", "content": question}]
            f.write(json.dumps({"id": f"g{i}", "messages": messages, "completion": "\n\n".join(parts)}) + "\n")
    return sum(lengths) / len(lengths)


def cmd_build(args) -> None:
    import tiny

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student_shape, teacher_shape = SHAPES[args.student_shape], SHAPES[args.teacher_shape]
    start = time.perf_counter()
    tokenizer = padded_tokenizer(args.vocab_tokens or student_shape["tokens"])
    for name, shape, seed in (("student", student_shape, 1), ("teacher", teacher_shape, 2)):
        model = build_model(shape, tokenizer, device, seed)
        tiny.save_model(work / name, model, tokenizer)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {getattr(args, f'{name}_shape')}-shaped Qwen2, {params / 1e6:,.1f} M parameters, "
              f"{shape['rows']} head rows, random init, saved in bfloat16")
        del model
    mean = write_data(work / "data.jsonl", tokenizer, args.rows, args.completion_tokens)
    (work / "build.json").write_text(json.dumps({"student": args.student_shape, "teacher": args.teacher_shape}))
    print(f"tokenizer: {len(tokenizer)} tokens (byte-level BPE + filler); data: {args.rows} rows, "
          f"completions {mean:.0f} tokens on average; built in {time.perf_counter() - start:.1f} s")


# ----------------------------------------------------------------------------------------------------------------
# train


def instrument(report):
    """Wrap the timed functions (see the module docstring) in the modules the scripts call them through; returns
    (the list each step's record is appended to, where the student and teacher were found)."""
    import generation
    import models
    import training

    phase, steps, state = defaultdict(float), [], {}

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            sync()
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                phase[name] += time.perf_counter() - start
        return wrapper

    def placed(model) -> str:
        param = next(model.parameters())
        return f"{str(param.dtype).removeprefix('torch.')} on {param.device}"

    teacher_forward = models.teacher_hidden_states

    def backbone(model, *a, **k):
        state.setdefault("teacher", placed(model))
        return teacher_forward(model, *a, **k)

    models.teacher_hidden_states = timed("teacher", backbone)
    generation.generate = timed("sampling", generation.generate)
    loop_iter, loop_step = training.TrainLoop.__iter__, training.TrainLoop.step

    def loop_iter_timed(self):
        sync()
        state["last"] = time.perf_counter()
        yield from loop_iter(self)

    def loop_step_timed(self, num_tokens, **kw):
        state.setdefault("student", placed(self.model) + (" + bf16 autocast" if self.args.bf16 else ""))
        sync()
        start = time.perf_counter()
        row = loop_step(self, num_tokens, **kw)
        sync()
        end = time.perf_counter()
        rec = {"tokens": float(num_tokens), "step_s": end - state["last"], "optimizer_s": end - start,
               "teacher_s": phase["teacher"], "sampling_s": phase["sampling"]}
        rec["student_s"] = rec["step_s"] - rec["optimizer_s"] - rec["teacher_s"] - rec["sampling_s"]
        steps.append(rec)
        phase.clear()
        state["last"] = end
        report(f"  step {len(steps)}: {rec['step_s']:.3f} s, {rec['tokens']:.0f} loss tokens ({split(rec)})")
        return row

    training.TrainLoop.__iter__ = loop_iter_timed
    training.TrainLoop.step = loop_step_timed
    training.TrainLoop.save = lambda self, tokenizer, path=None: Path(path or self.output_dir)
    return steps, state


PHASES = (("sampling_s", "sampling"), ("teacher_s", "teacher forward"),
          ("student_s", "student forward+loss+backward"), ("optimizer_s", "clip+AdamW+logging"))


def split(rec: dict) -> str:
    return ", ".join(f"{label} {rec[key]:.3f} s ({rec[key] / rec['step_s']:.0%})" for key, label in PHASES)


def cmd_train(args) -> None:
    work = Path(args.work)
    shapes = json.loads((work / "build.json").read_text())
    out_dir = work / f"run_{args.script}"
    shutil.rmtree(out_dir, ignore_errors=True)
    argv = ["--student", str(work / "student"), "--teacher", str(work / "teacher"), "--data",
            str(work / "data.jsonl"), "--output-dir", str(out_dir), "--max-steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--grad-accum", "1", "--lr", "1e-5", "--seed", "0",
            "--bf16", "--teacher-dtype", "bfloat16", "--log-every", str(args.steps)]
    if args.script == "on_policy":
        argv += ["--lmbda", "1", "--max-new-tokens", str(args.max_new_tokens)]
    real_stdout = sys.stdout

    def report(line: str) -> None:
        print(line, file=real_stdout, flush=True)

    script = importlib.import_module(args.script)
    steps, state = instrument(report)
    sampling = f", {args.max_new_tokens} sampled tokens per prompt" if args.script == "on_policy" else ""
    report(f"{args.script}.py: {args.steps} steps of batch {args.batch_size}{sampling}, {device_name()}; "
           f"student {shapes['student']}-shaped, teacher {shapes['teacher']}-shaped")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    log = work / f"{args.script}.log"
    try:
        with log.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            script.main(argv)
    except BaseException:
        report(f"  {args.script}.main failed; the end of its output:\n" + log.read_text()[-3000:])
        raise
    timed = steps[1:] or steps
    total = sum(r["step_s"] for r in timed)
    mean = {key: sum(r[key] for r in timed) / len(timed) for key, _ in PHASES}
    mean["step_s"] = total / len(timed)
    report(f"  student {state.get('student')}; teacher {state.get('teacher')}")
    report(f"  first step (warm-up{', pre-flight' if args.script == 'token_level' else ''}): "
           f"{steps[0]['step_s']:.3f} s")
    report(f"  steps 2-{len(steps)}: mean {mean['step_s']:.3f} s, median "
           f"{statistics.median(r['step_s'] for r in timed):.3f} s, "
           f"{sum(r['tokens'] for r in timed) / total:,.0f} loss tokens/s")
    report(f"  time split per step: {split(mean)}")
    report(f"  peak memory: {peak_memory()} (whole run: weights, gradients, AdamW state, activations)")


# ----------------------------------------------------------------------------------------------------------------
# decode


def load_prompts(work: Path, tokenizer, n: int) -> list[list[int]]:
    import common

    rows = common.read_jsonl(work / "data.jsonl")
    return [tokenizer(common.render_chat(tokenizer, rows[i % len(rows)]["messages"], add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"] for i in range(n)]


def median_time(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def decode_shapes(args) -> list[tuple[int, int]]:
    """(batch, new tokens) pairs from --batch and --new-tokens, which may list several (paired in order)."""
    if len(args.batch) != len(args.new_tokens):
        raise SystemExit(f"--batch lists {len(args.batch)} sizes, --new-tokens {len(args.new_tokens)}: pair them")
    return list(zip(args.batch, args.new_tokens))


def cmd_decode(args) -> None:
    import common
    import generation
    import models

    work = Path(args.work)
    shapes = json.loads((work / "build.json").read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = models.load_model(str(work / "student"), dtype="auto", device=device)
    model.generation_config.eos_token_id = None  # run every row to --new-tokens, as ours does with no stop id
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    for batch_size, new_tokens in decode_shapes(args):
        prompts = load_prompts(work, tokenizer, batch_size)
        batch = common.pad_batch([{"input_ids": p} for p in prompts], tokenizer.pad_token_id, side="left")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)

        def ours(n, prompts=prompts):
            # -1 is no token id, so no row stops early
            return [r["tokens"] for r in generation.generate(model, tokenizer, prompts, max_new_tokens=n,
                                                             stop_ids=[-1])]

        def theirs(n, ids=ids, mask=mask):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            return out[:, ids.shape[1]:].tolist()

        print(f"decode: batch {batch_size} x {new_tokens} new tokens, greedy, {shapes['student']}-shaped student "
              f"in {dtype}, {device_name()}, median of {args.reps} after a warm-up", flush=True)
        # Ours warms up at the timed shape: its first call at a shape captures the CUDA graph of the one-token
        # step (a one-time cost, reported), which later calls of that shape (every on-policy step) replay.
        first, _ = median_time(lambda ours=ours, n=new_tokens: ours(n), 1)
        note = "captures the CUDA graph" if device == "cuda" else "no CUDA graph on CPU"
        print(f"  generation.generate first call at this shape ({note}): {first:.3f} s", flush=True)
        results = {}
        for name, fn, warmup in (("generation.generate (ours)", ours, None),
                                 ("model.generate (transformers)", theirs, args.warmup_tokens)):
            if warmup:
                fn(warmup)
            seconds, tokens = median_time(lambda fn=fn, n=new_tokens: fn(n), args.reps)
            produced = sum(len(row) for row in tokens)
            results[name] = (seconds, produced, tokens)
            print(f"  {name:30s} {seconds:8.3f} s  {produced / seconds:10,.0f} tokens/s  ({produced} tokens)",
                  flush=True)
        (s_ours, n_ours, t_ours), (s_hf, n_hf, t_hf) = results.values()
        same = sum(a == b for a, b in zip(t_ours, t_hf))
        # A random model's argmax can land on a padded head row, which generation.generate never picks and
        # transformers does: from there on the two rows differ, with the same work per token.
        print(f"  ours / model.generate: {(n_ours / s_ours) / (n_hf / s_hf):.2f}x the tokens/s; identical greedy "
              f"tokens in {same} of {len(t_ours)} rows (rows part where transformers picks a padded head row); "
              f"peak memory {peak_memory()}", flush=True)


def cmd_vllm(args) -> None:
    if importlib.util.find_spec("vllm") is None:
        print("vLLM: not installed here, skipped")
        return
    if not torch.cuda.is_available():
        print("vLLM: needs CUDA, skipped")
        return
    import vllm
    from vllm.inputs import TokensPrompt

    import models

    work = Path(args.work)
    tokenizer = models.load_tokenizer(str(work / "student"))
    start = time.perf_counter()
    llm = vllm.LLM(model=str(work / "student"), dtype="bfloat16", gpu_memory_utilization=0.5, seed=0)
    print(f"vLLM {vllm.__version__}: engine ready in {time.perf_counter() - start:.1f} s", flush=True)
    for batch_size, new_tokens in decode_shapes(args):
        prompts = [TokensPrompt(prompt_token_ids=p) for p in load_prompts(work, tokenizer, batch_size)]

        def run(n, prompts=prompts):
            params = vllm.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
            return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

        run(args.warmup_tokens)
        seconds, tokens = median_time(lambda run=run, n=new_tokens: run(n), args.reps)
        produced = sum(len(row) for row in tokens)
        print(f"  vLLM LLM.generate                {seconds:8.3f} s  {produced / seconds:10,.0f} tokens/s  "
              f"({produced} tokens; batch {batch_size} x {new_tokens}, greedy, median of {args.reps})", flush=True)


# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="make the random-init models, the padded tokenizer and the data")
    build.add_argument("--student-shape", default="qwen2.5-0.5b", choices=sorted(SHAPES), help="student's sizes")
    build.add_argument("--teacher-shape", default="qwen2.5-1.5b", choices=sorted(SHAPES), help="teacher's sizes")
    build.add_argument("--vocab-tokens", type=int, default=None,
                       help="tokenizer length (default: the student shape's family, 151,665 for Qwen2.5)")
    build.add_argument("--rows", type=int, default=80, help="data rows (steps x batch size are read in order)")
    build.add_argument("--completion-tokens", type=int, default=256, help="approximate tokens per completion")
    train = sub.add_parser("train", help="time the steps of a training script's main()")
    train.add_argument("--script", required=True, choices=["token_level", "on_policy"], help="which script")
    train.add_argument("--steps", type=int, default=10, help="optimizer steps (the first is reported apart)")
    train.add_argument("--batch-size", type=int, default=8, help="sequences per step (one micro-batch)")
    train.add_argument("--max-new-tokens", type=int, default=256, help="tokens sampled per prompt (on_policy)")
    for name, what in (("decode", "time generation.generate against model.generate"),
                       ("vllm", "time vLLM's generate on the same prompts, when it is installed")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--batch", type=int, nargs="+", default=[8, 64],
                       help="prompts decoded together; several sizes run in turn, each with its --new-tokens")
        p.add_argument("--new-tokens", type=int, nargs="+", default=[128, 256],
                       help="tokens generated per prompt, one per --batch size (default: 8 x 128, the on-policy "
                            "shape, and 64 x 256)")
        p.add_argument("--reps", type=int, default=3, help="timed runs (the median is reported)")
        p.add_argument("--warmup-tokens", type=int, default=16, help="tokens of the untimed warm-up run")
    for p in sub.choices.values():
        p.add_argument("--work", required=True, help="folder the models and data are built in and read from")
    args = parser.parse_args()
    {"build": cmd_build, "train": cmd_train, "decode": cmd_decode, "vllm": cmd_vllm}[args.command](args)


if __name__ == "__main__":
    main()
