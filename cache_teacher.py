r"""Record the teacher once; then train students without the teacher loaded: its top-K next-token log-probabilities
with the exact tempered mass of the rest (small), a sample of its distribution (small, unbiased for forward KL), or
its final hidden states and output head (exact).

    # score the teacher's own answers (data/teacher.jsonl, from `python generate_data.py`) with the same teacher,
    # Qwen2.5-3B-Instruct, and keep its top 64 per completion token in data/teacher.top64 (for T = 1 and 2)
    python cache_teacher.py
    # token-level distillation from the cache: no teacher in memory, no teacher forward per step
    python token_level.py --teacher-cache data/teacher.top64 --output-dir runs/token_level-cached

    # a cache for other temperatures: token_level.py --temperature 4 needs a cache that holds T=4
    python cache_teacher.py --temperatures 1 2 4 --output data/teacher.top64-t1-2-4

    # unbiased forward KL: 64 tokens drawn from the teacher's distribution at each T, as ids with counts
    python cache_teacher.py --store sampled --samples 64 --temperatures 2
    python token_level.py --teacher-cache data/teacher.sampled64 --output-dir runs/token_level-sampled

    # exact: the teacher's final-norm hidden states (bfloat16, 2 * hidden size bytes per token) and its output head
    # once, in data/teacher.hidden; token_level.py then trains on the same loss as with the live teacher
    python cache_teacher.py --store hidden
    python token_level.py --teacher-cache data/teacher.hidden --kl reverse --output-dir runs/token_level-exact

    # another teacher: reads the data `generate_data.py --teacher` wrote for it, data/teacher_smollm2-1.7b-instruct
    # .jsonl, and writes data/teacher_smollm2-1.7b-instruct.top64 (what cross_tokenizer.py --teacher-cache reads)
    python cache_teacher.py --teacher HuggingFaceTB/SmolLM2-1.7B-Instruct

For every row of --data and every completion token plus the closing end-of-turn token (exactly the positions
token_level.py trains on), the cache holds the token id the teacher read, its (start, end) character offsets in
the completion, and what --store says (p is the teacher's next-token distribution, p_T = p^(1/T) / Z_T the same
at temperature T, for each T of --temperatures):

    topk     the teacher's top-K token ids and log-probabilities at T=1, and for each T the tail's tempered
             log-mass log sum_{v outside the top K} p(v)^(1/T). A reader rebuilds p_T over K+1 buckets (the K
             tokens and the tail) exactly: a coarsening of p_T, so every divergence between the buckets is at most
             the live one (data-processing inequality), equal when K is the vocabulary. The student's mass outside
             the K tokens is one bucket too, which is what reverse KL and JSD lose. About 6 * K + 4 * #T bytes/token.
    sampled  for each T, --samples draws from p_T (Anshumann et al., 2025, "Sparse Logit Sampling: Accelerating
             Knowledge Distillation in LLMs": random-sampling KD), kept as the distinct ids with their counts and
             log p_T of each: counts / N is an unbiased estimate of p_T, so the forward-KL (cross-entropy) target,
             its gradient and the logged div (teacher-entropy term included) are unbiased estimates of the live
             ones. Reverse KL and JSD are refused (see `sampled_forward_kl`). 8 bytes per distinct draw per T.
    hidden   h, the teacher's final-norm hidden state at the position that predicts the token, and once the output
             head W [rows, H]: the teacher's logits are h @ W^T, its whole distribution at any temperature, so the
             loss is the live teacher's (equal up to --hidden-dtype rounding of h). 2 * H bytes per token
             (H = 1536: ~3 KB, against ~600 KB for float32 logits of a 151k vocabulary), plus the head.

A top-K or sampled cache holds only the temperatures it was written for: a reader at another --temperature stops
with the cache_teacher.py command that writes one holding it. Sampling at T from draws at T=1 with importance
weights p_T / p would need no new draws, but its variance, sum_v p_T(v)^2 / p(v), grows with the whole vocabulary
at T > 1 (the tempered distribution is flatter than the one sampled): draws are taken at each T instead.

Layout of --output (format 2; format 1, before --temperatures, stored tail_logprob [N] = the T=1 tail, still
readable at T=1 only):

    cache.json                 format, store, teacher, teacher fingerprint (weights + tokenizer), vocabulary
                               fingerprint, chat-template fingerprint, shards, bytes/token; topk: K, temperatures,
                               logprob dtype; sampled: samples, temperatures, logprob dtype, seed; hidden: hidden
                               size, hidden dtype, head rows, head dtype, head file fingerprint
    shard-00000.safetensors    token_ids int32 [N], offsets int32 [N, 2], and
                               topk:    topk_ids int32 [N, K], topk_logprobs float16 [N, K],
                                        tail_logmass float32 [N, #T]
                               sampled: draw_lengths int16 [N, #T] (distinct ids per position and T), and flat,
                                        position by position then T by T: draw_ids int32 [M], draw_counts int16
                                        [M], draw_logprobs float16 [M] (log p_T of the id)
                               hidden:  hidden bfloat16 [N, H]
                               metadata "rows": [[id, first, n, fingerprint of the row's messages + completion]]
    head.safetensors           hidden only: weight [rows, H], the teacher's output head in the dtype it ran in

Readers memory-map the shards (`load_cache`) and read a batch's rows when it is collated: a process holds the pages
it reads, shared with every other process reading the same cache, instead of its own copy of the whole cache.
Shards are written under a temporary name and renamed when complete; re-running the same command after a crash
keeps the complete shards and scores only the rows they do not hold. Adding rows to a cache from another teacher,
store, K, samples, temperatures, template, dtype or format is refused, and so is a row whose id is cached for
another prompt or completion; readers skip (training) or refuse (held-out) a cached row whose fingerprint differs
from their data row's.

This module owns the cache: its format (above) and its math, which token_level.py and cross_tokenizer.py import
from here: `teacher_topk` and `teacher_samples` (what is stored), `cached_teacher_log_buckets` (the teacher's
top-K distribution a reader rebuilds), `topk_bucket_divergence`, `sampled_forward_kl` and `cached_teacher_loss`
(token_level.py's loss from a top-K or sampled cache), `open_cache`, `load_cache`, `collate_rows` and `load_head`
(a reader's checks, rows and batches) and `vocab_fingerprint` (which token ids a cache is valid for).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
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
import served_teacher

# cache.json "format": 2 = a top-K cache's tail at each of its temperatures, and the sampled store. Caches without
# the entry are format 1 (a top-K tail at T=1 only).
FORMAT = 2
LOGPROB_DTYPES = {"float16": torch.float16, "float32": torch.float32}
HIDDEN_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STORES = ("topk", "sampled", "hidden")
HEAD_FILE = "head.safetensors"
MAX_SAMPLES = 2**15 - 1  # draw counts and lengths are stored as int16
# What each store's tensors are named in a shard (in this order).
SHARD_TENSORS = {"topk": ("token_ids", "topk_ids", "topk_logprobs", "tail_logmass", "offsets"),
                 "sampled": ("token_ids", "draw_lengths", "draw_ids", "draw_counts", "draw_logprobs", "offsets"),
                 "hidden": ("token_ids", "hidden", "offsets")}
# Sampled-store tensors with one entry per distinct draw rather than per position; draw_lengths [N, #T] says how
# many belong to each position and temperature, in position-major order.
FLAT_TENSORS = ("draw_ids", "draw_counts", "draw_logprobs")
# The manifest entries a resumed run must share with the cache it adds rows to.
RECIPE_KEYS = {"topk": ("format", "teacher_fingerprint", "top_k", "temperatures", "vocab_fingerprint",
                        "template_fingerprint", "logprob_dtype"),
               "sampled": ("format", "teacher_fingerprint", "samples", "temperatures", "vocab_fingerprint",
                           "template_fingerprint", "logprob_dtype"),
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
                             "extension .topK (data/teacher.top64), .sampledN for --store sampled, or .hidden for "
                             "--store hidden")
    parser.add_argument("--store", default="topk", choices=STORES,
                        help="what is cached per token: topk = the top-K log-probabilities + the tail's exact "
                             "tempered mass (small; reverse KL/JSD see the student's tail as one bucket); sampled = "
                             "--samples draws from the teacher per temperature (small; forward KL only, unbiased); "
                             "hidden = the teacher's final-norm hidden state (2 * hidden size bytes) + its output "
                             "head once: the exact distribution at any temperature")
    parser.add_argument("--top-k", type=common.POSITIVE_INT, default=64,
                        help="teacher log-probabilities kept per token (--store topk)")
    parser.add_argument("--samples", type=common.bounded(int, 1, MAX_SAMPLES), default=64,
                        help="tokens drawn from the teacher per token and temperature (--store sampled), stored as "
                             "the distinct ids with their counts")
    parser.add_argument("--temperatures", type=common.bounded(float, 0, low_open=True), nargs="+",
                        default=[1.0, 2.0],
                        help="the temperatures a reader may train at (--store topk: the tail's tempered mass, 4 "
                             "bytes per token each; --store sampled: --samples draws each; --store hidden: any, "
                             "this flag is not used)")
    parser.add_argument("--batch-size", type=common.POSITIVE_INT, default=8, help="rows per teacher forward")
    parser.add_argument("--shard-rows", type=common.POSITIVE_INT, default=2000, help="rows per safetensors shard")
    parser.add_argument("--max-length", type=common.bounded(int, 2), default=1024,
                        help="longer rows are skipped and counted")
    parser.add_argument("--logprob-dtype", default="float16", choices=sorted(LOGPROB_DTYPES),
                        help="storage dtype of the teacher's log-probabilities (--store topk and sampled; float16 "
                             "halves them)")
    parser.add_argument("--hidden-dtype", default="bfloat16", choices=sorted(HIDDEN_DTYPES),
                        help="storage dtype of the hidden states (--store hidden): bfloat16 or float16 = 2 bytes per "
                             "value; float32 keeps a float32 teacher's states bit for bit")
    parser.add_argument("--chunk-size", type=common.bounded(int, 0, note=" (0 = automatic)"), default=0,
                        help="positions per [chunk, vocab] projection (0 = auto)")
    served_teacher.add_teacher_url_args(parser, top_k=False)
    args = parser.parse_args(argv)
    common.fill_default_data(args)
    args.temperatures = list(dict.fromkeys(args.temperatures))
    if args.teacher_url and args.store != "topk":
        parser.error(f"--teacher-url fills a --store topk cache only (a server returns top-K log-probabilities, "
                     f"not {'draws' if args.store == 'sampled' else 'hidden states'})")
    if args.output is None:
        suffix = {"topk": f".top{args.top_k}", "sampled": f".sampled{args.samples}", "hidden": ".hidden"}
        args.output = str(Path(args.data).with_suffix(suffix[args.store]))
    return args


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "cache.json"
    if not path.exists():
        raise common.DistillError(f"--teacher-cache '{folder}': no cache.json there (write one with cache_teacher.py)")
    manifest = json.loads(path.read_text())
    if manifest.get("format", 1) > FORMAT:
        raise common.DistillError(f"--teacher-cache '{folder}': written by a newer cache_teacher.py (format "
                                  f"{manifest['format']}; this one reads formats 1 to {FORMAT}); update this checkout")
    return manifest


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


def cache_temperatures(manifest: dict) -> list[float] | None:
    """The temperatures a top-K or sampled cache holds (a format-1 top-K cache: T=1 only); None for a hidden cache,
    which holds the teacher's logits and so every temperature."""
    if store_of(manifest) == "hidden":
        return None
    return manifest.get("temperatures", [1.0])


def temperature_column(manifest: dict, temperature: float) -> int:
    """Where `temperature` is in the cache's per-temperature tensors (checked by `open_cache`)."""
    temperatures = cache_temperatures(manifest)
    index = next((i for i, t in enumerate(temperatures) if math.isclose(t, temperature)), None)
    if index is None:
        raise ValueError(f"the cache holds temperatures {temperatures}, not {temperature:g}")
    return index


def cache_command(manifest: dict, folder: str | Path, temperatures: list[float]) -> str:
    """The cache_teacher.py command that writes this cache again, holding `temperatures`, into a new folder."""
    store = store_of(manifest)
    size = ["--top-k", str(manifest["top_k"])] if store == "topk" else ["--samples", str(manifest["samples"])]
    temps = [f"{t:g}" for t in temperatures]
    out = f"{str(folder).rstrip('/')}-t{'-'.join(temps)}"
    return shlex.join(["python", "cache_teacher.py", "--teacher", str(manifest["teacher"]), "--data",
                       str(manifest["data"]), "--store", store, *size, "--logprob-dtype",
                       manifest.get("logprob_dtype", "float16"), "--temperatures", *temps, "--output", out])


def open_cache(folder: str | Path, flag: str = "--teacher-cache", stores: tuple[str, ...] = ("topk", "hidden"), *,
               temperature: float | None = None, beta: float | None = None) -> dict:
    """The manifest of a cache a script is about to read, checked before any model loads: a store this script
    reads, for the hidden store a head file that is there and is the one the cache was written with, for the
    top-K and sampled stores the --temperature the script trains at, and for the sampled store forward KL (beta 0)."""
    manifest = read_manifest(folder)
    store = store_of(manifest)
    if store not in stores:
        why = (" (its draws give the teacher's probability only at the tokens drawn, not the sorted top-K this "
               "loss compares)" if store == "sampled" else "")
        raise common.DistillError(f"{flag} {folder}: a cache with --store {store}, which this script does not read "
                                  f"(it reads --store {' or '.join(stores)}){why}")
    if store == "hidden":
        head = Path(folder) / manifest.get("head_file", HEAD_FILE)
        if not head.is_file():
            raise common.DistillError(f"{flag} {folder}: the teacher's output head {head.name} is missing (a "
                                      "--store hidden cache needs it); re-run cache_teacher.py into this folder")
        if checkpoints.file_fingerprint(head) != manifest.get("head_fingerprint"):
            raise common.DistillError(f"{flag} {folder}: {head.name} is not the head this cache was written with "
                                      f"(fingerprint {checkpoints.file_fingerprint(head)}, cache.json: "
                                      f"{manifest.get('head_fingerprint')}); re-create the cache")
    if store == "sampled" and beta not in (None, 0.0):
        raise common.DistillError(
            f"{flag} {folder}: a --store sampled cache trains forward KL only, not {common.divergence_name(beta)}: "
            "that needs the teacher's probability wherever the student puts mass, and draws from the teacher "
            "reach the student's own mistakes only by chance (an importance-weighted estimate would be unbiased "
            "with an unbounded variance); use --kl forward, or a --store hidden (exact) or topk cache")
    temperatures = cache_temperatures(manifest)
    if temperature is not None and temperatures is not None and \
            not any(math.isclose(t, temperature) for t in temperatures):
        wanted = sorted({*temperatures, 1.0, 2.0, temperature})
        command = cache_command(manifest, folder, wanted)
        if manifest.get("format", 1) < 2:
            raise common.DistillError(
                f"{flag} {folder}: --temperature {temperature:g} from a format-1 top-K cache, which holds the tail "
                f"at T=1 only (older versions re-tempered it as one token: wrong at T != 1); rebuild it: {command}")
        raise common.DistillError(f"{flag} {folder}: the cache holds temperatures "
                                  f"{', '.join(f'{t:g}' for t in temperatures)}, not --temperature {temperature:g}; "
                                  f"write one that does: {command}")
    return manifest


def load_head(folder: str | Path, manifest: dict) -> torch.Tensor:
    """The teacher's output head weight [rows, H] of a --store hidden cache (checked by `open_cache`)."""
    with safe_open(Path(folder) / manifest.get("head_file", HEAD_FILE), framework="pt") as f:
        return f.get_tensor("weight")


def load_cache(folder: str | Path) -> tuple[dict, dict[str, dict]]:
    """(manifest, {row id: {"token_ids", "offsets", "row_fingerprint", and the store's tensors: "topk_ids",
    "topk_logprobs", "tail_logmass" [n, #T] (topk), "draw_lengths", "draw_ids", "draw_counts", "draw_logprobs"
    (sampled; the flat ones cut to the row's draws) or "hidden" (hidden)}}) of a cache; a reader must check
    "row_fingerprint" against its data row (None: an older cache, not checkable). A format-1 top-K cache's
    tail_logprob [n] is its tail_logmass at T=1.

    Every tensor is a view of the memory-mapped shard (safetensors maps the file for torch: nothing is read until
    used, and what is read is the page cache, shared by every process reading the same cache; tested by
    tests/test_cache_hidden.py): keep the views, index them only when a batch is collated (`collate_rows`)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    rows = {}
    for shard in complete_shards(folder):
        with safe_open(shard, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not iterable)
            metadata = f.metadata()
        if "tail_logprob" in tensors:
            tensors["tail_logmass"] = tensors.pop("tail_logprob")[:, None]
        if "draw_lengths" in tensors:  # where each position's draws start in the flat tensors
            per_position = tensors["draw_lengths"].shape[1]
            starts = F.pad(tensors["draw_lengths"].flatten().long().cumsum(0), (1, 0)).tolist()
        for row_id, first, n, *fingerprint in json.loads(metadata["rows"]):
            row = {}
            for name, t in tensors.items():
                if name in FLAT_TENSORS:
                    row[name] = t[starts[first * per_position]:starts[(first + n) * per_position]]
                else:
                    row[name] = t[first:first + n]
            row["row_fingerprint"] = fingerprint[0] if fingerprint else None
            rows[row_id] = row
    return manifest, rows


def collate_rows(rows: list[dict], manifest: dict, temperature: float,
                 positions: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A batch's teacher tensors from its cached rows (`load_cache`), in order, for training at `temperature`:

        hidden:  teacher_hidden [N, H]
        topk:    topk_ids [N, K] int64, topk_logprobs [N, K], tail_logmass [N] (the tail's log-mass at T)
        sampled: draw_ids [N, U] int64, draw_counts [N, U], draw_logprobs [N, U] at T, padded to the batch's
                 largest number U of distinct draws with count 0

    `positions` (topk and hidden): per row, the cached positions to take, in order (cross_tokenizer.py's aligned
    teacher tokens); default all. Only these rows are read from the memory-mapped shards."""
    store = store_of(manifest)
    positions = positions if positions is not None else [None] * len(rows)

    def take(name):
        return torch.cat([row[name] if index is None else row[name][index] for row, index in zip(rows, positions)])

    if store == "hidden":
        return {"teacher_hidden": take("hidden")}
    column = temperature_column(manifest, temperature)
    if store == "topk":
        return {"topk_ids": take("topk_ids").long(), "topk_logprobs": take("topk_logprobs"),
                "tail_logmass": take("tail_logmass")[:, column]}
    if any(index is not None for index in positions):
        raise ValueError("a sampled cache's rows are taken whole")
    lengths = take("draw_lengths").long()  # [N, #T]
    starts = (lengths.flatten().cumsum(0) - lengths.flatten()).view(lengths.shape)[:, column]  # [N]
    count = lengths[:, column]
    slot = torch.arange(int(count.max()) if count.numel() else 0)
    present = slot[None] < count[:, None]  # [N, U]
    flat = {name: take(name) for name in FLAT_TENSORS}
    index = torch.where(present, starts[:, None] + slot[None], 0)
    return {"draw_ids": torch.where(present, flat["draw_ids"][index], 0).long(),
            "draw_counts": torch.where(present, flat["draw_counts"][index], 0),
            "draw_logprobs": torch.where(present, flat["draw_logprobs"][index], 0)}


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


def _served_request(group: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """The token ids and loss masks of encoded rows, as `served_teacher.ServedTeacher.topk_rows` takes them."""
    return [ex["input_ids"] for ex in group], [ex["loss_mask"] for ex in group]


def row_generator(seed: int, row_id, device) -> torch.Generator:
    """The random draws of one row (--store sampled): seeded by --seed and the row's id, so that a resumed or
    re-batched run draws the same tokens for it."""
    return torch.Generator(device=device).manual_seed(int(common.fingerprint(f"{seed}/{row_id}"), 16) % 2**63)


def cache_into(args, out: Path) -> dict:
    rows = common.load_distill_rows(args.data)
    ids = [row.get("id") for row in rows]
    if None in ids or len(set(ids)) != len(ids):
        raise common.DistillError(f"--data {args.data}: every row needs a unique 'id' to be cached "
                                  "(generate_data.py writes one)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    served = None
    if args.teacher_url:  # the teacher runs behind a vLLM server; --teacher names its tokenizer (and fingerprint)
        served_teacher.check_temperature(args.teacher_url, args.temperatures)
        tokenizer = models.load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code, what="--teacher")
        served = served_teacher.ServedTeacher(args.teacher_url, top_k=min(args.top_k, len(tokenizer)),
                                              retries=args.teacher_retries, timeout=args.teacher_timeout)
        served.check_tokenizer(tokenizer, what="--teacher")
        vocab = len(tokenizer)
    else:
        teacher, tokenizer = models.load_model(args.teacher, dtype=args.dtype, device=device, what="--teacher",
                                               trust_remote_code=args.trust_remote_code)
        teacher = models.frozen_teacher(teacher)
        head = models.output_head(teacher)
        vocab = min(head.weight.shape[0], len(tokenizer))
    header = {"format": FORMAT, "teacher": args.teacher, "data": str(args.data), "vocab": vocab,
              **({"teacher_url": args.teacher_url, "served_model": served.model} if served else {}),
              "vocab_fingerprint": vocab_fingerprint(tokenizer),
              "teacher_fingerprint": models.model_fingerprint(args.teacher),
              "template_fingerprint": common.fingerprint(tokenizer.chat_template or "")}
    if args.store == "topk":
        args.top_k = min(args.top_k, vocab)  # K = vocabulary caches the whole distribution (tail empty)
        header = {"store": "topk", **header, "top_k": args.top_k, "temperatures": args.temperatures,
                  "logprob_dtype": args.logprob_dtype}
    elif args.store == "sampled":
        header = {"store": "sampled", **header, "samples": args.samples, "temperatures": args.temperatures,
                  "logprob_dtype": args.logprob_dtype, "seed": args.seed}
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
    logprob_dtype = LOGPROB_DTYPES[args.logprob_dtype]
    starts = range(0, len(examples), args.batch_size)
    # served: the next batch's request is in flight while this one is written
    answers = {starts[0]: served.prefetch(*_served_request(examples[:args.batch_size]))} if served and examples else {}
    for lo in tqdm(starts, desc=f"teacher {args.store}", disable=not examples):
        group = examples[lo:lo + args.batch_size]
        sizes = [len(ex["completion_offsets"]) for ex in group]  # masked positions come out row by row, in order
        if served is not None:
            if lo + args.batch_size < len(examples):
                answers[lo + args.batch_size] = served.prefetch(
                    *_served_request(examples[lo + args.batch_size:lo + 2 * args.batch_size]))
            served_rows = answers.pop(lo).result()
            token_ids = torch.cat([r["token_ids"] for r in served_rows])
            topk_ids, topk_logprobs, tail = (torch.cat([r[name] for r in served_rows])
                                             for name in ("topk_ids", "topk_logprobs", "tail_logmass"))
            bad, overflow = (~torch.isfinite(topk_logprobs[:, 0])).nonzero().flatten().tolist(), []
        else:
            batch = {k: v.to(device) for k, v in common.pad_batch(group, tokenizer.pad_token_id).items()}
            with torch.inference_mode():
                hidden = models.teacher_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])
                teacher_hidden, token_ids = common.shift_for_next_token(hidden, batch)  # [N, H], [N]
                overflow = []
                if args.store == "topk":
                    topk_ids, topk_logprobs, tail = teacher_topk(teacher_hidden, head.weight, args.top_k,
                                                                 vocab=vocab, temperatures=args.temperatures,
                                                                 chunk_size=args.chunk_size)
                    # The top-1 log-probability is finite for any finite logits; NaN or inf logits make it NaN.
                    bad = (~torch.isfinite(topk_logprobs[:, 0])).nonzero().flatten().tolist()
                elif args.store == "sampled":
                    drawn = [teacher_samples(part, head.weight, args.samples, vocab=vocab,
                                             temperatures=args.temperatures,
                                             generator=row_generator(args.seed, ex["id"], device),
                                             chunk_size=args.chunk_size)
                             for ex, part in zip(group, teacher_hidden.split(sizes))]
                    bad = (~torch.cat([finite for *_, finite in drawn])).nonzero().flatten().tolist()
                else:
                    stored = teacher_hidden.to(HIDDEN_DTYPES[args.hidden_dtype])
                    bad = (~torch.isfinite(teacher_hidden).all(-1)).nonzero().flatten().tolist()
                    overflow = (~torch.isfinite(stored).all(-1)).nonzero().flatten().tolist()
        if bad or overflow:
            index = bad[0] if bad else overflow[0]
            ends = torch.tensor(sizes).cumsum(0).tolist()
            row = next(i for i, end in enumerate(ends) if index < end)
            token = index - (ends[row - 1] if row else 0) + 1
            where = f"on --data row id={group[row]['id']}, completion token {token} (nothing of this batch was cached)"
            if bad:
                raise common.nonfinite_logits_error("--teacher", where)
            raise common.DistillError(f"--hidden-dtype {args.hidden_dtype}: the teacher's hidden state overflows it "
                                      f"{where}; use --hidden-dtype bfloat16")
        first = 0
        for i, (ex, n) in enumerate(zip(group, sizes)):
            part = slice(first, first + n)
            piece = {"id": ex["id"], "row_fingerprint": ex["row_fingerprint"], "token_ids": token_ids[part].int().cpu()}
            if args.store == "topk":
                piece.update(topk_ids=topk_ids[part].int().cpu(), topk_logprobs=topk_logprobs[part].to(logprob_dtype)
                             .cpu(), tail_logmass=tail[part].float().cpu())
            elif args.store == "sampled":
                lengths, draw_ids, counts, logprobs, _ = drawn[i]
                piece.update(draw_lengths=lengths.short().cpu(), draw_ids=draw_ids.int().cpu(),
                             draw_counts=counts.short().cpu(), draw_logprobs=logprobs.to(logprob_dtype).cpu())
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
    if args.store == "hidden":
        what = (f"{args.hidden_dtype} hidden states (H={header['hidden_size']}) + a "
                f"{manifest['head_bytes'] / 1e6:.2f} MB head")
    else:
        what = (f"top-{args.top_k}" if args.store == "topk" else f"{args.samples} draws") + \
            f" at T={', '.join(f'{t:g}' for t in args.temperatures)}"
    print(f"cached {manifest['rows']} rows, {tokens} tokens, {what}: {size / 1e6:.2f} MB "
          f"({manifest['bytes_per_token']} bytes/token) in {out}")
    if skipped:
        print(f"skipped {skipped} rows longer than --max-length {args.max_length}")
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# The cache's math: what it stores (teacher_topk, teacher_samples), how a reader turns it into a distribution
# (cached_teacher_log_buckets) and the loss token_level.py trains on from it (cached_teacher_loss).

# A large finite floor instead of -inf: an empty bucket's log-mass stays finite (see cached_teacher_log_buckets).
_BUCKET_FLOOR = -1e30


def teacher_topk(teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, k: int, *, vocab: int,
                 temperatures: tuple[float, ...] | list[float] = (1.0,),
                 chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-K next-token log-probabilities at T=1 and, for each temperature T, the tail's tempered
    log-mass log sum_{v outside the top K} p(v)^(1/T).

    teacher_hidden [N, H] -> (topk_ids [N, K] int64, topk_logprobs [N, K] fp32 descending, tail_logmass [N, #T]
    fp32), chunk by chunk over positions. With log p from the full logsumexp, the tail is a logsumexp over the
    tokens outside the top K of log p / T (exact, no 1 - sum(p) cancellation); -inf when the top K hold every
    token. At T=1 it is the log of the tail's probability. The tempered mass is not (sum_tail p)^(1/T): that is
    what a reader could not rebuild from the T=1 tail alone.
    """
    ids, logprobs, tails = [], [], []
    k = min(k, vocab)
    chunk_size = chunk_size or losses.auto_chunk_size(vocab)
    for lo in range(0, teacher_hidden.shape[0], chunk_size):
        logits = (teacher_hidden[lo:lo + chunk_size] @ teacher_weight[:vocab].T).float()  # [C, V]
        logp = logits.log_softmax(-1)
        top, index = logp.topk(k, dim=-1)
        rest = logp.scatter_(-1, index, float("-inf"))  # [C, V]: the tail's log p, -inf at the top K
        tails.append(torch.stack([(rest / t).logsumexp(-1) for t in temperatures], dim=-1))
        ids.append(index)
        logprobs.append(top)
    return torch.cat(ids), torch.cat(logprobs), torch.cat(tails)


def teacher_samples(teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, samples: int, *, vocab: int,
                    temperatures: tuple[float, ...] | list[float], generator: torch.Generator | None = None,
                    chunk_size: int = 0):
    """`samples` draws with replacement from each position's tempered next-token distribution p_T =
    softmax(logits / T), for each T, kept as the distinct tokens drawn (random-sampling KD: Anshumann et al.,
    2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs").

    teacher_hidden [N, H] -> (draw_lengths [N, #T] int64: distinct tokens per position and T; then flat, position
    by position, T by T, ids increasing: draw_ids [M] int64, draw_counts [M] int32 (summing to `samples` per
    position and T), draw_logprobs [M] fp32 = log p_T(id); finite [N] bool: False where the logits were not all
    finite, whose draws mean nothing and must be refused). Chunk by chunk over positions; `generator` seeds the
    draws.
    """
    lengths, ids, counts, logprobs, finite = [], [], [], [], []
    chunk_size = max(1, (chunk_size or losses.auto_chunk_size(vocab)) // len(temperatures))
    for lo in range(0, teacher_hidden.shape[0], chunk_size):
        logits = (teacher_hidden[lo:lo + chunk_size] @ teacher_weight[:vocab].T).float()  # [C, V]
        ok = torch.isfinite(logits).all(-1)
        logits = torch.where(ok[:, None], logits, 0.0)  # draws at a bad position are refused by the caller
        logp = torch.stack([(logits / t).log_softmax(-1) for t in temperatures], dim=1)  # [C, #T, V]
        draws = torch.multinomial(logp.flatten(0, 1).exp(), samples, replacement=True, generator=generator)
        count = torch.zeros(logp.shape, dtype=torch.int32, device=logits.device).flatten(0, 1)
        count = count.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.int32)).view(logp.shape)  # [C, #T, V]
        where = count.nonzero(as_tuple=True)  # (position, T, id), in that lexicographic order
        lengths.append((count > 0).sum(-1))
        ids.append(where[2])
        counts.append(count[where])
        logprobs.append(logp[where])
        finite.append(ok)
    return torch.cat(lengths), torch.cat(ids), torch.cat(counts), torch.cat(logprobs), torch.cat(finite)


def cached_teacher_log_buckets(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, k: int,
                               temperature: float) -> torch.Tensor:
    """The teacher's log-probabilities at temperature T over k+1 buckets, from a top-K cache (cache_teacher.py).

    topk_logprobs [N, K] (log p at T=1), tail_logmass [N] (log sum_tail p^(1/T), the cache's column for this T)
    -> [N, k+1] for k <= K: the top k cached tokens (still descending) and one tail bucket holding the rest
    (cached tokens beyond k join it):

        log q_T = log_softmax([l_1 / T, .., l_k / T, logsumexp(l_{k+1} / T, .., l_K / T, tail_logmass)])

    exactly the tempered distribution p^(1/T) / Z_T with the tail's tokens merged into one bucket (no token's
    mass is re-tempered as a whole). The one place token_level and cross_tokenizer read a top-K cache.
    """
    scaled = topk_logprobs.to(torch.promote_types(topk_logprobs.dtype, torch.float32)) / temperature
    tail = torch.cat([scaled[:, k:], tail_logmass.to(scaled.dtype)[:, None]], dim=-1).logsumexp(-1, keepdim=True)
    # A large finite floor instead of -inf: an empty tail (K = vocabulary) must give 0 mass, not NaN gradients.
    return F.log_softmax(torch.cat([scaled[:, :k], tail.clamp_min(_BUCKET_FLOOR)], dim=-1), dim=-1)


def topk_bucket_divergence(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                           tail_logmass: torch.Tensor, beta: float, temperature: float = 1.0) -> torch.Tensor:
    """Per-position D_beta between teacher and student over K+1 buckets: the teacher's cached top-K tokens and one
    tail bucket for the rest of the vocabulary. [N, V], [N, K], [N, K], [N] -> [N], T^2-scaled.

    Student buckets: log softmax(z / T) at the K ids, and the log of its remaining mass (exact logsumexp over the
    other tokens). Teacher buckets: `cached_teacher_log_buckets` with the cache's tail at this T. Both are the
    same coarsening of the two tempered distributions, so the result is at most the full-vocabulary D_beta
    (data-processing inequality; every D_beta is an f-divergence) and equal to it when the K tokens are the whole
    vocabulary. What it misses is how each side's tail mass is spread: for reverse KL and JSD, the student's mass
    on tokens outside the teacher's top K counts as one bucket. beta = 0 is forward KL(teacher || student), 1
    reverse; the divergence is that of `common.generalized_jsd_per_position` on the bucket distributions
    (DistillKit's offline top-K, with a tail).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    scaled = student_logits.to(dtype) / temperature
    lse = scaled.logsumexp(-1, keepdim=True)
    student_top = scaled.gather(-1, topk_ids) - lse  # [N, K]
    student_tail = scaled.scatter(-1, topk_ids, _BUCKET_FLOOR).logsumexp(-1, keepdim=True) - lse  # [N, 1]
    student_buckets = torch.cat([student_top, student_tail], dim=-1)
    teacher_buckets = cached_teacher_log_buckets(topk_logprobs, tail_logmass, topk_ids.shape[-1], temperature)
    return common.generalized_jsd_per_position(student_buckets, teacher_buckets.to(dtype), beta, 1.0) * temperature**2


def sampled_forward_kl(student_logits: torch.Tensor, draw_ids: torch.Tensor, draw_counts: torch.Tensor,
                       draw_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position estimate of T^2 * KL(p_T || q_T) from N tokens drawn from the teacher's p_T at cache time
    (`teacher_samples`), with q_T = softmax(student_logits / T). [N, V], [N, U], [N, U], [N, U] -> [N].

        T^2 * sum_u (c_u / n) * (log p_T(v_u) - log q_T(v_u)),     n = sum_u c_u

    over the U distinct drawn tokens v_u with counts c_u (padding: count 0). E[c_u / n] = p_T(v_u), so the value
    is an unbiased estimate of the forward KL, teacher-entropy term included, and its gradient, T (q_T - c / n)
    at the logits, of the live gradient T (q_T - p_T) (random-sampling KD, Anshumann et al., 2025). Taking log
    p_T at the same draws (rather than the exact entropy) makes the estimate's variance vanish as q_T -> p_T.

    Only forward KL: reverse KL sum_v q_T log(q_T / p_T) and JSD weigh the teacher's log-probability by the
    student's mass, which the teacher's draws see only where both put mass; E_p[(q/p) log(q/p)] over the draws
    would be unbiased, with a variance sum_v q^2 / p (times a log) that is unbounded exactly on the tokens reverse
    KL is there to push down. `open_cache` refuses them.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    scaled = student_logits.to(dtype) / temperature
    student_logp = scaled.gather(-1, draw_ids) - scaled.logsumexp(-1, keepdim=True)  # [N, U]
    weights = draw_counts.to(dtype)
    weights = weights / weights.sum(-1, keepdim=True)
    return (weights * (draw_logprobs.to(dtype) - student_logp)).sum(-1) * temperature**2


# The batch tensors (collate_rows) each store's divergence takes, in its argument order.
BATCH_TENSORS = {"topk": ("topk_ids", "topk_logprobs", "tail_logmass"),
                 "sampled": ("draw_ids", "draw_counts", "draw_logprobs")}


def cached_teacher_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, targets: torch.Tensor,
                        num_tokens, cache: dict, *, alpha: float, beta: float, temperature: float,
                        chunk_size: int = 0, vocab: int | None = None):
    """alpha * CE + (1 - alpha) * D, summed over positions / num_tokens, chunk by chunk; D is
    `topk_bucket_divergence` from a top-K cache or `sampled_forward_kl` from a sampled one (beta must be 0).

    student_hidden [N, H], student_weight [V, H], targets [N]; cache holds the aligned teacher rows at this
    temperature (`collate_rows`): topk_ids [N, K], topk_logprobs [N, K], tail_logmass [N], or draw_ids [N, U],
    draw_counts [N, U], draw_logprobs [N, U]. Each chunk's [C, V] logits are recomputed in backward
    (checkpointing) rather than kept. Returns (loss, ce_sum, div_sum), the sums detached for logging.
    """
    store = "sampled" if "draw_ids" in cache else "topk"
    if store == "sampled" and beta != 0:
        raise ValueError("a sampled cache estimates forward KL only (beta = 0)")
    student_weight = losses.full_weight(student_weight)
    vocab = vocab or student_weight.shape[0]
    chunk_size = chunk_size or losses.auto_chunk_size(vocab)
    num_tokens = max(float(num_tokens), 1.0)

    def piece(hidden, target, *teacher):
        logits = hidden @ student_weight[:vocab].T  # [C, V]
        ce = F.cross_entropy(logits.to(dtype), target, reduction="sum")
        if store == "sampled":
            div = sampled_forward_kl(logits, *teacher, temperature).sum()
        else:
            div = topk_bucket_divergence(logits, *teacher, beta, temperature).sum()
        return torch.stack([ce, div])

    dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    total = student_hidden.new_zeros(2, dtype=dtype)
    for lo in range(0, student_hidden.shape[0], chunk_size):
        part = slice(lo, lo + chunk_size)
        total = total + checkpoint(piece, student_hidden[part], targets[part],
                                   *(cache[name][part] for name in BATCH_TENSORS[store]), use_reentrant=False)
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
