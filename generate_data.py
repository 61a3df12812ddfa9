r"""The teacher answers prompts; its completions become the training data of every distillation script.

    # the blog's data, every flag at its default: Qwen2.5-3B-Instruct answers the first 500 GSM8K train problems
    # greedily, told to end with '#### N'; written to data/teacher.jsonl, where the training scripts look for it
    python generate_data.py

    # the cross-tokenizer teacher's data: written to data/teacher_smollm2-1.7b-instruct.jsonl, cross_tokenizer's
    # default --data
    python generate_data.py --teacher HuggingFaceTB/SmolLM2-1.7B-Instruct

    # the whole GSM8K train split, sampled, at serving speed on a GPU with vLLM (pip install vllm)
    python generate_data.py --num-examples all --temperature 0.7 --vllm --batch-size 512 \
        --output data/gsm8k_3b_sampled.jsonl

    # a local file of prompts (any of .jsonl .json .parquet .csv)
    python generate_data.py --teacher ./my_teacher --dataset prompts.jsonl --prompt-field prompt \
        --answer-field "" --num-examples all --output data/mine.jsonl

Each output row: {"id", "messages": [system, user], "completion", "answer", "teacher", "teacher_fingerprint",
"generation", "finish_reason", "completion_tokens"}. The run is resumable: re-running the same command skips ids
already in the output, a killed run loses at most the batch in flight, and a torn last line is cut off before
appending. Appending with another teacher (other weights) or other sampling settings is refused, and so is a
second generate_data.py writing the same --output at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

import checkpoints
import common
import generation
import models


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--teacher", default=common.BLOG_TEACHER, help="teacher: hub id or local folder")
    common.add_prompt_dataset_args(parser, split="train", num_examples=common.BLOG_TRAIN_PROBLEMS)
    parser.add_argument("--max-new-tokens", type=common.POSITIVE_INT, default=512,
                        help="max tokens per completion; a completion cut there is written with finish_reason "
                             "'length' (see the training scripts' --truncated)")
    parser.add_argument("--temperature", type=common.bounded(float, 0, note=" (0 = greedy)"), default=0.0,
                        help="sampling temperature (0 = greedy, the blog's choice)")
    parser.add_argument("--top-p", type=common.POSITIVE_FRACTION, default=0.95,
                        help="nucleus sampling threshold, in (0, 1]")
    parser.add_argument("--batch-size", type=common.POSITIVE_INT, default=16, help="prompts per generate() call")
    parser.add_argument("--output", default=None,
                        help="JSONL file to write (appended to when resuming); default: the file the training "
                             f"scripts read for this --teacher: {common.DEFAULT_DATA} for {common.BLOG_TEACHER}, "
                             "data/teacher_<name>.jsonl for another (<name>: its last part, lower-cased)")
    generation.add_vllm_args(parser)
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = common.default_data_path(args.teacher)
    return args


def load_done(path: Path) -> dict[str, dict]:
    """Rows already written, by id. A torn last line (a kill mid-write) is cut off so the run can append."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        print(f"{path}: dropping a torn last line ({len(data) - keep} bytes) left by an interrupted run")
        with path.open("r+b") as f:
            f.truncate(keep)
    return {row["id"]: row for row in common.read_jsonl(path, what="--output")}


def drop_empty_rows(path: Path) -> None:
    """Remove the rows with an empty completion from `path` before their ids are generated again, so that the file
    never holds two rows of one id (a row trained twice, an ambiguous --teacher-cache id). The file is replaced at
    once (`checkpoints.replace_locked_file`): a crash leaves the old one or the new one."""
    lines = path.read_bytes().splitlines(keepends=True)
    keep = [line for line in lines if not line.strip() or str(json.loads(line).get("completion") or "").strip()]
    checkpoints.replace_locked_file(path, b"".join(keep))


def check_same_generation(path: Path, done: dict[str, dict], teacher: str, teacher_fingerprint: str,
                          settings: dict) -> None:
    """Refuse to append to rows written by another teacher or with other sampling settings: the file would hold
    two distributions under one name. The seed may differ (other draws from the same distribution); rows of an
    older version without a teacher fingerprint are compared by the --teacher name only."""
    for row in done.values():
        theirs = row.get("generation") or {}
        differ = [f"--{k.replace('_', '-')} {v} (file: {theirs[k]})" for k, v in settings.items()
                  if k != "seed" and k in theirs and theirs[k] != v]
        if row.get("teacher_fingerprint") is not None and row["teacher_fingerprint"] != teacher_fingerprint:
            differ.insert(0, f"--teacher '{teacher}' (file: '{row.get('teacher')}', other weights)")
        elif row.get("teacher_fingerprint") is None and row.get("teacher") != teacher:
            differ.insert(0, f"--teacher '{teacher}' (file: '{row.get('teacher')}')")
        if differ:
            raise common.DistillError(f"--output {path} holds rows generated otherwise (row {row.get('id')}): "
                                      f"{'; '.join(differ)}; appending would mix them: write to a new --output")


def main(argv=None):
    args = parse_args(argv)
    out_path = Path(args.output)
    checkpoints.check_output_path(out_path, "--output", folder=False)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    created = not out_path.exists()
    # The output file itself is the lock: a second generate_data.py writing it is refused, not interleaved.
    checkpoints.lock_output(out_path, "--output", out_path, record_pid=False)
    try:
        generate_into(args, out_path)
    finally:
        if created and out_path.stat().st_size == 0:
            out_path.unlink()  # nothing was written: leave no empty file behind
        checkpoints.unlock_output(out_path)


def generate_into(args, out_path: Path) -> None:
    models.seed_everything(args.seed)
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed}
    teacher_fingerprint = models.model_fingerprint(args.teacher)
    prompts = common.prompts_from_args(args)
    done = load_done(out_path)
    check_same_generation(out_path, done, args.teacher, teacher_fingerprint, settings)
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    todo, redo = [], 0
    for row in prompts:
        row_id = f"{args.split}-{row['index']}"
        messages = system + [{"role": "user", "content": row["prompt"]}]
        if row_id in done:
            if done[row_id]["messages"] != messages:
                raise common.DistillError(f"{out_path}: row id {row_id} was written for a different prompt or "
                                          "system prompt; write to a new --output")
            if str(done[row_id].get("completion") or "").strip():
                continue
            # An empty completion (from a broken run) is not an answer: generate it again, in its place (below).
            redo += 1
        todo.append({"id": row_id, "messages": messages, "answer": row["answer"]})
    if redo:
        print(f"{out_path}: {redo} row{'s' if redo > 1 else ''} with an empty completion (left by a broken run?) "
              "will be generated again")
        drop_empty_rows(out_path)
    print(f"{len(prompts)} prompts, {len(done) - redo} already in {out_path}, {len(todo)} to generate")
    if not todo:
        return

    if args.vllm:
        tokenizer = models.load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code, what="--teacher")
        sampler = generation.VLLMSampler(args.teacher, dtype=args.dtype, seed=args.seed,
                                         gpu_memory_utilization=args.vllm_gpu_memory,
                                         trust_remote_code=args.trust_remote_code, enforce_eager=args.vllm_eager)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        teacher, tokenizer = models.load_model(args.teacher, dtype=args.dtype, device=device, what="--teacher",
                                               trust_remote_code=args.trust_remote_code)
    stop_ids = common.end_of_turn_ids(tokenizer)
    cut = written = empty = 0
    with out_path.open("a", encoding="utf-8") as out, tqdm(total=len(todo), desc="generate") as bar:
        for lo in range(0, len(todo), args.batch_size):
            batch = todo[lo:lo + args.batch_size]
            # Seed per batch from its first id: a re-run of the same command samples the same completions.
            torch.manual_seed(args.seed + int(common.fingerprint(batch[0]["id"]), 16) % 2**31)
            prompt_ids = [tokenizer(common.render_chat(tokenizer, r["messages"], add_generation_prompt=True),
                                    add_special_tokens=False)["input_ids"] for r in batch]
            sample = sampler.generate if args.vllm else partial(generation.generate, teacher, tokenizer,
                                                                what="--teacher")
            results = sample(prompt_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, stop_ids=stop_ids)
            lines = []
            for row, res in zip(batch, results):
                tokens = res["tokens"][:-1] if res["finished"] else res["tokens"]
                completion = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                if not completion:  # a row saying "answered" would keep it from ever being generated again
                    empty += 1
                    continue
                cut += not res["finished"]
                written += 1
                lines.append(json.dumps({
                    "id": row["id"], "messages": row["messages"], "completion": completion,
                    "answer": row["answer"], "teacher": args.teacher, "teacher_fingerprint": teacher_fingerprint,
                    "generation": settings,
                    "finish_reason": "stop" if res["finished"] else "length", "completion_tokens": len(tokens),
                }, ensure_ascii=False) + "\n")
            # One write + fsync per batch: a kill loses at most this batch, and at worst tears its last line.
            out.write("".join(lines))
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(batch))
    if empty and not written:
        raise common.DistillError(f"--teacher returned an empty completion for every prompt ({empty}); nothing was "
                                  "written. Check that it is a chat model whose template matches its training, and "
                                  "its --dtype")
    print(f"wrote {written} rows to {out_path}" +
          (f"; {cut} hit --max-new-tokens without an end-of-turn token (finish_reason 'length')" if cut else ""))
    if empty:
        print(f"warning: {empty} prompts got an empty completion and were not written; re-running generates them "
              "again")


if __name__ == "__main__":
    common.run_main(main)
