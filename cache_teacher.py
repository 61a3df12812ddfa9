"""Record the teacher's top-K next-token log-probabilities once; then train students without the teacher loaded.

    # score the teacher's own answers (generate_data.py output) and keep its top 64 per completion token
    python cache_teacher.py --teacher Qwen/Qwen2.5-1.5B-Instruct --data data/gsm8k_teacher.jsonl --top-k 64 \
        --output data/gsm8k_teacher.top64
    # token-level distillation from the cache: no teacher in memory, no teacher forward per step
    python token_level.py --student Qwen/Qwen2.5-0.5B --data data/gsm8k_teacher.jsonl \
        --teacher-cache data/gsm8k_teacher.top64 --kl forward --temperature 2.0 --output-dir runs/token_cached

For every row of --data and every completion token plus the closing end-of-turn token (exactly the positions
token_level.py trains on), the cache holds the token id the teacher read, the teacher's top-K token ids and
log-probabilities at T=1, the log of the probability mass outside the top K, and the token's (start, end)
character offsets in the completion. Layout of --output:

    cache.json                 teacher, K, vocabulary fingerprint, chat-template fingerprint, shards, bytes/token
    shard-00000.safetensors    token_ids int32 [N], topk_ids int32 [N, K], topk_logprobs float16 [N, K],
                               tail_logprob float32 [N], offsets int32 [N, 2]; metadata "rows": [[id, first, n]]

Shards are written under a temporary name and renamed when complete; re-running the same command after a crash
keeps the complete shards and scores only the rows they do not hold.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

import common

LOGPROB_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--teacher", default="Qwen/Qwen2.5-1.5B-Instruct", help="teacher model: hub id or folder")
    parser.add_argument("--data", required=True, help="JSONL written by generate_data.py (messages + completion)")
    parser.add_argument("--output", required=True, help="cache folder to write (resumed when it exists)")
    parser.add_argument("--top-k", type=int, default=64, help="teacher log-probabilities kept per token")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per teacher forward")
    parser.add_argument("--shard-rows", type=int, default=2000, help="rows per safetensors shard")
    parser.add_argument("--max-length", type=int, default=1024, help="longer rows are skipped and counted")
    parser.add_argument("--logprob-dtype", default="float16", choices=sorted(LOGPROB_DTYPES),
                        help="storage dtype of the top-K log-probabilities (float16 halves the cache)")
    parser.add_argument("--chunk-size", type=int, default=0, help="positions per [chunk, vocab] projection (0 = auto)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.shard_rows < 1 or args.batch_size < 1:
        parser.error("--top-k, --shard-rows and --batch-size must be >= 1")
    return args


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "cache.json"
    if not path.exists():
        raise common.DistillError(f"--teacher-cache '{folder}': no cache.json there (write one with cache_teacher.py)")
    return json.loads(path.read_text())


def complete_shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.safetensors"))


def cached_rows(folder: Path) -> list[list]:
    """[[row id, first, n tokens], ...] of every complete shard, read from the shard headers only."""
    rows = []
    for shard in complete_shards(folder):
        with safe_open(shard, framework="pt") as f:
            rows += json.loads(f.metadata()["rows"])
    return rows


def load_cache(folder: str | Path) -> tuple[dict, dict[str, dict]]:
    """(manifest, {row id: {"token_ids", "topk_ids", "topk_logprobs", "tail_logprob", "offsets"}}) of a cache."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    rows = {}
    for shard in complete_shards(folder):
        with safe_open(shard, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not iterable)
            for row_id, first, n in json.loads(f.metadata()["rows"]):
                rows[row_id] = {name: t[first:first + n] for name, t in tensors.items()}
    return manifest, rows


def write_shard(folder: Path, index: int, pieces: list[dict]) -> None:
    rows, first = [], 0
    for piece in pieces:
        rows.append([piece["id"], first, len(piece["token_ids"])])
        first += len(piece["token_ids"])
    tensors = {name: torch.cat([p[name] for p in pieces]).contiguous()
               for name in ("token_ids", "topk_ids", "topk_logprobs", "tail_logprob", "offsets")}
    tmp = folder / f".shard-{index:05d}.tmp"
    save_file(tensors, tmp, metadata={"rows": json.dumps(rows)})
    os.replace(tmp, folder / f"shard-{index:05d}.safetensors")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output)
    rows = common.load_distill_rows(args.data)
    ids = [row.get("id") for row in rows]
    if None in ids or len(set(ids)) != len(ids):
        raise common.DistillError(f"--data {args.data}: every row needs a unique 'id' to be cached "
                                  "(generate_data.py writes one)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, tokenizer = common.load_model(args.teacher, dtype=args.dtype, device=device, what="--teacher",
                                           trust_remote_code=args.trust_remote_code)
    teacher = common.frozen_teacher(teacher)
    head = common.output_head(teacher)
    vocab = min(head.weight.shape[0], len(tokenizer))
    args.top_k = min(args.top_k, vocab)  # K = vocabulary caches the whole distribution (tail empty)
    header = {"teacher": args.teacher, "data": str(args.data), "top_k": args.top_k, "vocab": vocab,
              "vocab_fingerprint": common.vocab_fingerprint(tokenizer),
              "template_fingerprint": common.fingerprint(tokenizer.chat_template or ""),
              "logprob_dtype": args.logprob_dtype}
    out.mkdir(parents=True, exist_ok=True)
    done = set()
    if (out / "cache.json").exists():  # resuming: the cache must be the same recipe
        old = read_manifest(out)
        changed = [k for k in ("top_k", "vocab_fingerprint", "logprob_dtype") if old.get(k) != header[k]]
        if changed:
            raise common.DistillError(f"--output {out} holds a cache with other {', '.join(changed)}; "
                                      "use a new folder")
        done = {row_id for row_id, _, _ in cached_rows(out)}
    (out / "cache.json").write_text(json.dumps({**header, "complete": False}, indent=2) + "\n")

    todo = [row for row in rows if row["id"] not in done]
    examples, skipped = common.encode_rows(todo, tokenizer, args.max_length) if todo else ([], 0)
    shard_index, pieces = len(complete_shards(out)), []
    for lo in tqdm(range(0, len(examples), args.batch_size), desc="teacher top-k", disable=not examples):
        group = examples[lo:lo + args.batch_size]
        batch = {k: v.to(device) for k, v in common.pad_batch(group, tokenizer.pad_token_id).items()}
        with torch.inference_mode():
            hidden = common.backbone_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])
            teacher_hidden, token_ids = common.shift_for_next_token(hidden, batch)  # [N, H], [N]
            topk_ids, topk_logprobs, tail = common.teacher_topk(teacher_hidden, head.weight, args.top_k,
                                                                vocab=vocab, chunk_size=args.chunk_size)
        first = 0
        for ex in group:  # masked positions come out row by row, in order
            n = len(ex["completion_offsets"])
            part = slice(first, first + n)
            pieces.append({"id": ex["id"], "token_ids": token_ids[part].int().cpu(),
                           "topk_ids": topk_ids[part].int().cpu(),
                           "topk_logprobs": topk_logprobs[part].to(LOGPROB_DTYPES[args.logprob_dtype]).cpu(),
                           "tail_logprob": tail[part].float().cpu(),
                           "offsets": torch.tensor(ex["completion_offsets"], dtype=torch.int32)})
            first += n
        if len(pieces) >= args.shard_rows:
            write_shard(out, shard_index, pieces)
            shard_index, pieces = shard_index + 1, []
    if pieces:
        write_shard(out, shard_index, pieces)

    shards = complete_shards(out)
    tokens = sum(n for _, _, n in cached_rows(out))
    size = sum(p.stat().st_size for p in shards)
    manifest = {**header, "complete": True, "rows": len(rows) - skipped, "tokens": tokens,
                "shards": [p.name for p in shards], "bytes": size, "bytes_per_token": round(size / max(tokens, 1), 1)}
    (out / "cache.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"cached {manifest['rows']} rows, {tokens} tokens, top-{args.top_k}: {size / 1e6:.2f} MB "
          f"({manifest['bytes_per_token']} bytes/token) in {out}")
    if skipped:
        print(f"skipped {skipped} rows longer than --max-length {args.max_length}")
    return manifest


if __name__ == "__main__":
    common.run_main(main)
