r"""Record the teacher once; then train students without the teacher loaded: its top-K next-token log-probabilities
(approximate), or its final hidden states and output head (exact).

    # score the teacher's own answers (data/teacher.jsonl, from `python generate_data.py`) with the same teacher,
    # Qwen2.5-3B-Instruct, and keep its top 64 per completion token in data/teacher.top64
    python cache_teacher.py
    # token-level distillation from the cache: no teacher in memory, no teacher forward per step
    python token_level.py --teacher-cache data/teacher.top64 --output-dir runs/token_level-cached

    # exact: the teacher's final-norm hidden states (bfloat16, 2 * hidden size bytes per token) and its output head
    # once, in data/teacher.hidden; token_level.py then trains on the same loss as with the live teacher
    python cache_teacher.py --store hidden
    python token_level.py --teacher-cache data/teacher.hidden --kl reverse --output-dir runs/token_level-exact

    # another teacher: reads the data `generate_data.py --teacher` wrote for it, data/teacher_smollm2-1.7b-instruct
    # .jsonl, and writes data/teacher_smollm2-1.7b-instruct.top64 (what cross_tokenizer.py --teacher-cache reads)
    python cache_teacher.py --teacher HuggingFaceTB/SmolLM2-1.7B-Instruct

For every row of --data and every completion token plus the closing end-of-turn token (exactly the positions
token_level.py trains on), the cache holds the token id the teacher read, its (start, end) character offsets in
the completion, and what --store says:

    topk    the teacher's top-K token ids and log-probabilities at T=1 and the log of the mass outside the top K.
            Exact at T=1 for forward KL over the K tokens; at T != 1 the tail is re-tempered as one token, and the
            student's mass outside the teacher's top K is one bucket, so reverse KL (which penalizes exactly that
            mass) and JSD are approximations. About 6 * K bytes per token.
    hidden  h, the teacher's final-norm hidden state at the position that predicts the token, and once the output
            head W [rows, H]: the teacher's logits are h @ W^T, its whole distribution at any temperature, so the
            loss is the live teacher's (equal up to --hidden-dtype rounding of h). 2 * H bytes per token
            (H = 1536: ~3 KB, against ~600 KB for float32 logits of a 151k vocabulary), plus the head.

Layout of --output:

    cache.json                 store, teacher, teacher fingerprint (weights + tokenizer), vocabulary fingerprint,
                               chat-template fingerprint, shards, bytes/token; topk: K, logprob dtype;
                               hidden: hidden size, hidden dtype, head rows, head dtype, head file fingerprint
    shard-00000.safetensors    token_ids int32 [N], offsets int32 [N, 2], and
                               topk:   topk_ids int32 [N, K], topk_logprobs float16 [N, K], tail_logprob float32 [N]
                               hidden: hidden bfloat16 [N, H]
                               metadata "rows": [[id, first, n, fingerprint of the row's messages + completion]]
    head.safetensors           hidden only: weight [rows, H], the teacher's output head in the dtype it ran in

Shards are written under a temporary name and renamed when complete; re-running the same command after a crash
keeps the complete shards and scores only the rows they do not hold. Adding rows to a cache from another teacher,
store, K, template or dtype is refused, and so is a row whose id is cached for another prompt or completion;
readers skip (training) or refuse (held-out) a cached row whose fingerprint differs from their data row's.

This module owns the cache: its format (above) and its math, which token_level.py and cross_tokenizer.py import
from here: `teacher_topk` (what is stored), `cached_teacher_log_buckets` (the teacher's distribution a reader
rebuilds), `topk_bucket_divergence` and `cached_teacher_loss` (token_level.py's loss from a top-K cache),
`open_cache` and `load_head` (a reader's checks and the hidden store's head) and `vocab_fingerprint` (which token
ids a cache is valid for).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

import checkpoints
import common
import losses
import models

LOGPROB_DTYPES = {"float16": torch.float16, "float32": torch.float32}
HIDDEN_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STORES = ("topk", "hidden")
HEAD_FILE = "head.safetensors"
# What each store's tensors are named in a shard (in this order).
SHARD_TENSORS = {"topk": ("token_ids", "topk_ids", "topk_logprobs", "tail_logprob", "offsets"),
                 "hidden": ("token_ids", "hidden", "offsets")}
# The manifest entries a resumed run must share with the cache it adds rows to.
RECIPE_KEYS = {"topk": ("teacher_fingerprint", "top_k", "vocab_fingerprint", "template_fingerprint", "logprob_dtype"),
               "hidden": ("store", "teacher_fingerprint", "vocab_fingerprint", "template_fingerprint",
                          "hidden_dtype", "head_dtype")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--teacher", default=common.BLOG_TEACHER, help="teacher model: hub id or folder")
    parser.add_argument("--data", default=None,
                        help="JSONL written by generate_data.py (messages + completion); default: the file it "
                             f"writes for --teacher ({common.DEFAULT_DATA} for {common.BLOG_TEACHER})")
    parser.add_argument("--output", default=None,
                        help="cache folder to write (resumed when it exists); default: --data's path with the "
                             "extension .topK (data/teacher.top64), or .hidden for --store hidden")
    parser.add_argument("--store", default="topk", choices=STORES,
                        help="what is cached per token: topk = the top-K log-probabilities + tail (small, "
                             "approximate at T != 1 and for reverse KL/JSD); hidden = the teacher's final-norm "
                             "hidden state (2 * hidden size bytes) + its output head once: the exact distribution")
    parser.add_argument("--top-k", type=common.POSITIVE_INT, default=64,
                        help="teacher log-probabilities kept per token (--store topk)")
    parser.add_argument("--batch-size", type=common.POSITIVE_INT, default=8, help="rows per teacher forward")
    parser.add_argument("--shard-rows", type=common.POSITIVE_INT, default=2000, help="rows per safetensors shard")
    parser.add_argument("--max-length", type=common.bounded(int, 2), default=1024,
                        help="longer rows are skipped and counted")
    parser.add_argument("--logprob-dtype", default="float16", choices=sorted(LOGPROB_DTYPES),
                        help="storage dtype of the top-K log-probabilities (float16 halves the cache; --store topk)")
    parser.add_argument("--hidden-dtype", default="bfloat16", choices=sorted(HIDDEN_DTYPES),
                        help="storage dtype of the hidden states (--store hidden): bfloat16 or float16 = 2 bytes per "
                             "value; float32 keeps a float32 teacher's states bit for bit")
    parser.add_argument("--chunk-size", type=common.bounded(int, 0, note=" (0 = automatic)"), default=0,
                        help="positions per [chunk, vocab] projection (0 = auto)")
    args = parser.parse_args(argv)
    common.fill_default_data(args)
    if args.output is None:
        args.output = str(Path(args.data).with_suffix(".hidden" if args.store == "hidden" else f".top{args.top_k}"))
    return args


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "cache.json"
    if not path.exists():
        raise common.DistillError(f"--teacher-cache '{folder}': no cache.json there (write one with cache_teacher.py)")
    return json.loads(path.read_text())


def complete_shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.safetensors"))


def cached_rows(folder: Path) -> list[list]:
    """[[row id, first, n tokens, row fingerprint], ...] of every complete shard, read from the shard headers only.
    The fingerprint (`common.row_fingerprint`: messages + completion) is None in caches of older versions."""
    rows = []
    for shard in complete_shards(folder):
        with safe_open(shard, framework="pt") as f:
            rows += [[*row, None][:4] for row in json.loads(f.metadata()["rows"])]
    return rows


def store_of(manifest: dict) -> str:
    """The manifest's --store (caches written before --store existed are top-K)."""
    return manifest.get("store", "topk")


def open_cache(folder: str | Path, flag: str = "--teacher-cache", stores: tuple[str, ...] = STORES) -> dict:
    """The manifest of a cache a script is about to read, checked before any model loads: a store this script
    reads, and for the hidden store a head file that is there and is the one the cache was written with."""
    manifest = read_manifest(folder)
    store = store_of(manifest)
    if store not in stores:
        raise common.DistillError(f"{flag} {folder}: a cache with --store {store}, which this script does not read "
                                  f"(it reads --store {' or '.join(stores)})")
    if store == "hidden":
        head = Path(folder) / manifest.get("head_file", HEAD_FILE)
        if not head.is_file():
            raise common.DistillError(f"{flag} {folder}: the teacher's output head {head.name} is missing (a "
                                      "--store hidden cache needs it); re-run cache_teacher.py into this folder")
        if checkpoints.file_fingerprint(head) != manifest.get("head_fingerprint"):
            raise common.DistillError(f"{flag} {folder}: {head.name} is not the head this cache was written with "
                                      f"(fingerprint {checkpoints.file_fingerprint(head)}, cache.json: "
                                      f"{manifest.get('head_fingerprint')}); re-create the cache")
    return manifest


def load_head(folder: str | Path, manifest: dict) -> torch.Tensor:
    """The teacher's output head weight [rows, H] of a --store hidden cache (checked by `open_cache`)."""
    with safe_open(Path(folder) / manifest.get("head_file", HEAD_FILE), framework="pt") as f:
        return f.get_tensor("weight")


def load_cache(folder: str | Path) -> tuple[dict, dict[str, dict]]:
    """(manifest, {row id: {"token_ids", "offsets", "row_fingerprint", and the store's tensors: "topk_ids",
    "topk_logprobs", "tail_logprob" (topk) or "hidden" (hidden)}}) of a cache; a reader must check
    "row_fingerprint" against its data row (None: an older cache, not checkable)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    rows = {}
    for shard in complete_shards(folder):
        with safe_open(shard, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not iterable)
            for row_id, first, n, *fingerprint in json.loads(f.metadata()["rows"]):
                rows[row_id] = {name: t[first:first + n] for name, t in tensors.items()}
                rows[row_id]["row_fingerprint"] = fingerprint[0] if fingerprint else None
    return manifest, rows


def write_shard(folder: Path, index: int, pieces: list[dict], store: str = "topk") -> None:
    rows, first = [], 0
    for piece in pieces:
        rows.append([piece["id"], first, len(piece["token_ids"]), piece["row_fingerprint"]])
        first += len(piece["token_ids"])
    tensors = {name: torch.cat([p[name] for p in pieces]).contiguous()
               for name in SHARD_TENSORS[store]}
    tmp = folder / f".shard-{index:05d}.tmp"
    save_file(tensors, tmp, metadata={"rows": json.dumps(rows)})
    os.replace(tmp, folder / f"shard-{index:05d}.safetensors")


def check_resumable(out: Path, header: dict, rows: list[dict]) -> set[str]:
    """The ids already cached in `out`, after checking that the cache is this run's recipe and that every cached
    row was scored on the same messages and completion as --data's row of that id."""
    if not (out / "cache.json").exists():
        return set()
    old = read_manifest(out)
    if store_of(old) != store_of(header):
        raise common.DistillError(f"--output {out} holds a --store {store_of(old)} cache; this run writes --store "
                                  f"{store_of(header)}; use a new folder")
    changed = [k for k in RECIPE_KEYS[store_of(header)] if old.get(k) != header[k]]
    if changed:
        raise common.DistillError(f"--output {out} holds a cache of teacher '{old.get('teacher')}' with another "
                                  f"{', '.join(changed)} (or from an older cache_teacher.py); use a new folder")
    cached = cached_rows(out)
    if any(fingerprint is None for *_, fingerprint in cached):
        raise common.DistillError(f"--output {out} was written by an older cache_teacher.py that did not record "
                                  "what each row was scored on; use a new folder")
    wanted = {row["id"]: common.row_fingerprint(row) for row in rows}
    clash = [row_id for row_id, _, _, fingerprint in cached if row_id in wanted and wanted[row_id] != fingerprint]
    if clash:
        raise common.DistillError(f"--output {out}: {len(clash)} cached rows (e.g. id {clash[0]}) were scored on "
                                  "another prompt or completion than the --data row of that id; use a new folder")
    return {row_id for row_id, *_ in cached}


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output)
    checkpoints.check_output_path(out, "--output", folder=True)
    leftover = sorted(p.name for p in out.iterdir() if p.name != checkpoints.LOCK_NAME) if out.exists() else []
    if leftover and "cache.json" not in leftover:
        raise common.DistillError(f"--output {out} is a non-empty folder without a cache.json "
                                  f"({', '.join(leftover[:5])}); choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    checkpoints.lock_output(out / checkpoints.LOCK_NAME, "--output", out)  # one cache_teacher.py per folder at a time
    try:
        return cache_into(args, out)
    finally:
        checkpoints.unlock_output(out / checkpoints.LOCK_NAME)


def cache_into(args, out: Path) -> dict:
    rows = common.load_distill_rows(args.data)
    ids = [row.get("id") for row in rows]
    if None in ids or len(set(ids)) != len(ids):
        raise common.DistillError(f"--data {args.data}: every row needs a unique 'id' to be cached "
                                  "(generate_data.py writes one)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, tokenizer = models.load_model(args.teacher, dtype=args.dtype, device=device, what="--teacher",
                                           trust_remote_code=args.trust_remote_code)
    teacher = models.frozen_teacher(teacher)
    head = models.output_head(teacher)
    vocab = min(head.weight.shape[0], len(tokenizer))
    header = {"teacher": args.teacher, "data": str(args.data), "vocab": vocab,
              "vocab_fingerprint": vocab_fingerprint(tokenizer),
              "teacher_fingerprint": models.model_fingerprint(args.teacher),
              "template_fingerprint": common.fingerprint(tokenizer.chat_template or "")}
    if args.store == "topk":
        args.top_k = min(args.top_k, vocab)  # K = vocabulary caches the whole distribution (tail empty)
        header = {"store": "topk", **header, "top_k": args.top_k, "logprob_dtype": args.logprob_dtype}
    else:
        if not torch.isfinite(head.weight).all():
            raise common.DistillError(f"--teacher {args.teacher}: its output head holds NaN/inf; check the checkpoint")
        header = {"store": "hidden", **header, "hidden_size": head.weight.shape[1], "head_rows": head.weight.shape[0],
                  "hidden_dtype": args.hidden_dtype, "head_dtype": str(head.weight.dtype).removeprefix("torch."),
                  "head_file": HEAD_FILE}
    done = check_resumable(out, header, rows)
    if args.store == "hidden":  # the head once (again on a resume: the same teacher writes the same bytes)
        tmp = out / f".{HEAD_FILE}.tmp"
        save_file({"weight": head.weight.detach().contiguous().cpu()}, tmp)
        os.replace(tmp, out / HEAD_FILE)
        header["head_fingerprint"] = checkpoints.file_fingerprint(out / HEAD_FILE)
    (out / "cache.json").write_text(json.dumps({**header, "complete": False}, indent=2) + "\n")

    todo = [row for row in rows if row["id"] not in done]
    examples, skipped = common.encode_rows(todo, tokenizer, args.max_length) if todo else ([], 0)
    shard_index, pieces = len(complete_shards(out)), []
    for lo in tqdm(range(0, len(examples), args.batch_size), desc=f"teacher {args.store}", disable=not examples):
        group = examples[lo:lo + args.batch_size]
        batch = {k: v.to(device) for k, v in common.pad_batch(group, tokenizer.pad_token_id).items()}
        with torch.inference_mode():
            hidden = models.teacher_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])
            teacher_hidden, token_ids = common.shift_for_next_token(hidden, batch)  # [N, H], [N]
            if args.store == "topk":
                topk_ids, topk_logprobs, tail = teacher_topk(teacher_hidden, head.weight, args.top_k,
                                                             vocab=vocab, chunk_size=args.chunk_size)
                # The top-1 log-probability is finite for any finite logits; NaN or inf logits make it NaN.
                bad = (~torch.isfinite(topk_logprobs[:, 0])).nonzero().flatten().tolist()
            else:
                stored = teacher_hidden.to(HIDDEN_DTYPES[args.hidden_dtype])
                bad = (~torch.isfinite(teacher_hidden).all(-1)).nonzero().flatten().tolist()
                overflow = (~torch.isfinite(stored).all(-1)).nonzero().flatten().tolist()
        if bad or (args.store == "hidden" and overflow):
            index = bad[0] if bad else overflow[0]
            ends = torch.tensor([len(ex["completion_offsets"]) for ex in group]).cumsum(0).tolist()
            row = next(i for i, end in enumerate(ends) if index < end)
            token = index - (ends[row - 1] if row else 0) + 1
            where = f"on --data row id={group[row]['id']}, completion token {token} (nothing of this batch was cached)"
            if bad:
                raise common.nonfinite_logits_error("--teacher", where)
            raise common.DistillError(f"--hidden-dtype {args.hidden_dtype}: the teacher's hidden state overflows it "
                                      f"{where}; use --hidden-dtype bfloat16")
        first = 0
        for ex in group:  # masked positions come out row by row, in order
            n = len(ex["completion_offsets"])
            part = slice(first, first + n)
            piece = {"id": ex["id"], "row_fingerprint": ex["row_fingerprint"], "token_ids": token_ids[part].int().cpu()}
            if args.store == "topk":
                piece.update(topk_ids=topk_ids[part].int().cpu(),
                             topk_logprobs=topk_logprobs[part].to(LOGPROB_DTYPES[args.logprob_dtype]).cpu(),
                             tail_logprob=tail[part].float().cpu())
            else:
                piece["hidden"] = stored[part].cpu()
            piece["offsets"] = torch.tensor(ex["completion_offsets"], dtype=torch.int32)
            pieces.append(piece)
            first += n
        if len(pieces) >= args.shard_rows:
            write_shard(out, shard_index, pieces, args.store)
            shard_index, pieces = shard_index + 1, []
    if pieces:
        write_shard(out, shard_index, pieces, args.store)

    shards = complete_shards(out)
    tokens = sum(n for _, _, n, _ in cached_rows(out))
    size = sum(p.stat().st_size for p in shards)
    manifest = {**header, "complete": True, "rows": len(rows) - skipped, "tokens": tokens,
                "shards": [p.name for p in shards], "bytes": size, "bytes_per_token": round(size / max(tokens, 1), 1)}
    if args.store == "hidden":
        manifest["head_bytes"] = (out / HEAD_FILE).stat().st_size
    (out / "cache.json").write_text(json.dumps(manifest, indent=2) + "\n")
    what = (f"top-{args.top_k}" if args.store == "topk" else f"{args.hidden_dtype} hidden states "
            f"(H={header['hidden_size']}) + a {manifest['head_bytes'] / 1e6:.2f} MB head")
    print(f"cached {manifest['rows']} rows, {tokens} tokens, {what}: {size / 1e6:.2f} MB "
          f"({manifest['bytes_per_token']} bytes/token) in {out}")
    if skipped:
        print(f"skipped {skipped} rows longer than --max-length {args.max_length}")
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# The cache's math: what it stores (teacher_topk), how a reader turns it into a distribution
# (cached_teacher_log_buckets) and the loss token_level.py trains on from it (cached_teacher_loss).

# A large finite floor instead of -inf: an empty bucket's log-mass stays finite (see cached_teacher_log_buckets).
_BUCKET_FLOOR = -1e30


def teacher_topk(teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, k: int, *, vocab: int,
                 chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-K next-token log-probabilities at T=1 and the log of the mass outside them.

    teacher_hidden [N, H] -> (topk_ids [N, K] int64, topk_logprobs [N, K] fp32 descending, tail_logprob [N] fp32),
    chunk by chunk over positions. The tail is logsumexp of the logits outside the top K minus the full
    logsumexp (exact, no 1 - sum(p) cancellation); -inf when the top K hold all the mass.
    """
    ids, logprobs, tails = [], [], []
    k = min(k, vocab)
    chunk_size = chunk_size or losses.auto_chunk_size(vocab)
    for lo in range(0, teacher_hidden.shape[0], chunk_size):
        logits = (teacher_hidden[lo:lo + chunk_size] @ teacher_weight[:vocab].T).float()  # [C, V]
        lse = logits.logsumexp(-1)
        top, index = logits.topk(k, dim=-1)
        tails.append(logits.scatter_(-1, index, float("-inf")).logsumexp(-1) - lse)
        ids.append(index)
        logprobs.append(top - lse[:, None])
    return torch.cat(ids), torch.cat(logprobs), torch.cat(tails)


def cached_teacher_log_buckets(topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, k: int,
                               temperature: float) -> torch.Tensor:
    """The teacher's log-probabilities at temperature T over k+1 buckets, from a T=1 top-K cache (cache_teacher.py).

    [N, K], [N] -> [N, k+1] for k <= K: the top k cached tokens (still descending) and one tail bucket holding
    the rest (cached tokens beyond k join it). Re-tempering: log q(T) = log_softmax([l_1 .. l_k, l_tail] / T),
    exact for the k tokens relative to each other but treating the tail as one token; the true tempered tail,
    sum over the tail tokens of p_v^(1/T), is larger for T > 1 (the cache does not know how the tail mass is
    spread). At T = 1 the buckets are exact. The one place token_level and cross_tokenizer read a cache.
    """
    logprobs = topk_logprobs.to(torch.promote_types(topk_logprobs.dtype, torch.float32))
    tail = torch.cat([logprobs[:, k:], tail_logprob.to(logprobs.dtype)[:, None]], dim=-1).logsumexp(-1, keepdim=True)
    # A large finite floor instead of -inf: an empty tail (K = vocabulary) must give 0 mass, not NaN gradients.
    return F.log_softmax(torch.cat([logprobs[:, :k], tail.clamp_min(_BUCKET_FLOOR)], dim=-1) / temperature, dim=-1)


def topk_bucket_divergence(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                           tail_logprob: torch.Tensor, beta: float, temperature: float = 1.0) -> torch.Tensor:
    """Per-position D_beta between teacher and student over K+1 buckets: the teacher's cached top-K tokens and one
    tail bucket for the rest of the vocabulary. [N, V], [N, K], [N, K], [N] -> [N], T^2-scaled.

    Student buckets: log softmax(z / T) at the K ids, and the log of its remaining mass (exact logsumexp over the
    other tokens). Teacher buckets at temperature T are a *re-tempering* of the T=1 cache
    (`cached_teacher_log_buckets`: exact at T = 1, the tail treated as one token otherwise). beta = 0 is forward
    KL(teacher || student), 1 reverse; the divergence is that of `common.generalized_jsd_per_position` on the
    bucket distributions (DistillKit's offline top-K, with a tail).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    scaled = student_logits.to(dtype) / temperature
    lse = scaled.logsumexp(-1, keepdim=True)
    student_top = scaled.gather(-1, topk_ids) - lse  # [N, K]
    student_tail = scaled.scatter(-1, topk_ids, _BUCKET_FLOOR).logsumexp(-1, keepdim=True) - lse  # [N, 1]
    student_buckets = torch.cat([student_top, student_tail], dim=-1)
    teacher_buckets = cached_teacher_log_buckets(topk_logprobs, tail_logprob, topk_ids.shape[-1], temperature)
    return common.generalized_jsd_per_position(student_buckets, teacher_buckets.to(dtype), beta, 1.0) * temperature**2


def cached_teacher_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, targets: torch.Tensor,
                        num_tokens, cache: dict, *, alpha: float, beta: float, temperature: float,
                        chunk_size: int = 0, vocab: int | None = None):
    """alpha * CE + (1 - alpha) * `topk_bucket_divergence`, summed over positions / num_tokens, chunk by chunk.

    student_hidden [N, H], student_weight [V, H], targets [N]; cache holds the aligned teacher rows:
    topk_ids [N, K], topk_logprobs [N, K], tail_logprob [N]. Each chunk's [C, V] logits are recomputed in backward
    (checkpointing) rather than kept. Returns (loss, ce_sum, kl_sum), the sums detached for logging.
    """
    student_weight = losses.full_weight(student_weight)
    vocab = vocab or student_weight.shape[0]
    chunk_size = chunk_size or losses.auto_chunk_size(vocab)
    num_tokens = max(float(num_tokens), 1.0)

    def piece(hidden, target, ids, logprobs, tail):
        logits = hidden @ student_weight[:vocab].T  # [C, V]
        ce = F.cross_entropy(logits.to(dtype), target, reduction="sum")
        soft = topk_bucket_divergence(logits, ids, logprobs, tail, beta, temperature).sum()
        return torch.stack([ce, soft])

    dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    total = student_hidden.new_zeros(2, dtype=dtype)
    for lo in range(0, student_hidden.shape[0], chunk_size):
        part = slice(lo, lo + chunk_size)
        total = total + checkpoint(piece, student_hidden[part], targets[part], cache["topk_ids"][part],
                                   cache["topk_logprobs"][part], cache["tail_logprob"][part], use_reentrant=False)
    loss = (alpha * total[0] + (1 - alpha) * total[1]) / num_tokens
    return loss, total[0].detach(), total[1].detach()


def run_inputs(manifest: dict) -> checkpoints.RunInputs:
    """What --resume compares of a run trained from this cache: the teacher, store, K and dtypes it holds (the
    folder's path may change). --teacher and --teacher-dtype play no part in such a run."""
    keys = ["teacher_fingerprint", "top_k", "vocab_fingerprint", "logprob_dtype"]
    if manifest.get("store") == "hidden":  # (top-K caches keep the fingerprint they had before --store)
        keys += ["store", "hidden_dtype"]
    content = common.fingerprint(json.dumps([manifest.get(k) for k in keys]))
    return checkpoints.RunInputs(contents={"teacher_cache_content": ("--teacher-cache teacher/store/K/dtype", content)},
                                 adjustable=("teacher_cache",), ignored=("teacher", "teacher_dtype"))


def vocab_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary (token -> id) and special tokens: equal means same token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return common.fingerprint(json.dumps([vocab, tokenizer.all_special_tokens], ensure_ascii=False))


if __name__ == "__main__":
    common.run_main(main)
