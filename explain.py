r"""Figures of what each method transfers, drawn from real models and data (each PNG comes with a JSON of its numbers).

    # sequence- vs token-level: at the completion position where the teacher is least sure (highest entropy among
    # the first --rows rows), the teacher's argmax one-hot beside its full distribution, teacher vs student top-20
    # at T=1 and T=2, and a 1-D bimodal toy fitted under forward vs reverse KL with our own loss function
    python explain.py mechanisms --teacher runs/teacher --student runs/token_level --data data/teacher.jsonl

    # cross-tokenizer (ULD): both segmentations of one completion, the end-offset alignment between them (pairs
    # whose ends differ in red), and the sorted top-K + tail vectors the loss compares at one aligned pair; the title
    # gives the tokens both vocabularies hold (--uld-match hybrid) and the probability each model puts on them
    python explain.py alignment --teacher HuggingFaceTB/SmolLM2-1.7B-Instruct --student runs/cross_tokenizer \
        --data data/teacher_smollm2-1.7b-instruct.jsonl

    # inside the students: logit lens per layer, the attention head that changed most from the base, and the
    # first answer token, for the base and each distilled student (full models or LoRA adapters, merged)
    python explain.py inside --base Qwen/Qwen2.5-0.5B --models runs/sequence_level runs/token_level-forward \
        runs/on_policy --data data/teacher_heldout.jsonl

    # on-policy: which optimizer steps sampled from the student, and the loss of each kind of step
    python explain.py stepmix runs/on_policy

    # the demo's figures (make demo writes them itself, into demo_out/full/figures/)
    python explain.py mechanisms --teacher demo_out/full/teacher_round0 --student demo_out/full/token_level \
        --data demo_out/full/dev_teacher_data.jsonl --out demo_out/full/figures

Every subcommand writes NAME.png and NAME.json (the numbers behind the figure) under --out and prints their paths:
mechanisms.png, alignment.png, logit_lens.png + attention_heads.png + first_token.png + first_token_shift.png +
attention_layer.png (inside.json), stepmix.png.
Models are read with plain transformers (output_hidden_states / output_attentions with eager attention), in
float32 on --device.

- Logit lens: the probability of the reference next token at every completion position, read from each layer's
  hidden state through the model's final norm and output head, averaged over positions. The last hidden state
  transformers returns already has the final norm applied, so the last layer's value is the model's own output.
- Most-changed head: per (layer, head), the mean over completion positions of sum_key |A_student - A_base|, the
  L1 distance between the two attention rows (0 = unchanged, 2 = disjoint).
- First answer token: the mean next-token distribution right after the generation prompt of each row (the first
  token of the reply, not the first token after '#### ': that one comes after the model's own working, a prefix
  that differs between models, so the same position would not be compared).
- First-token shift: that distribution of each student minus the base's, P_student(v) - P_base(v), on the tokens
  whose probability moved most in any student: what distillation taught the model to start its reply with.
- Attention layer: every head of one layer (--layer) on the first row, for the base and each student, with the
  mean entropy of each head's attention rows (low = sharp, attends to few tokens).
- Alignment: `cross_tokenizer.align_by_end_offsets` on `common.encode_chat`'s completion offsets, exactly what
  cross_tokenizer.py trains on; coverage = share of student tokens whose teacher partner ends at the same
  character, and the mean end-offset gap.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import checks
import common
import cross_tokenizer
import models
import plot_metrics

DPI = 100
MAX_LENGTH = 4096


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{mechanisms,alignment,inside,stepmix}")

    def add(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--out", default="figures", help="folder for the PNG and its JSON of numbers")
        return p

    def add_models(p, *, device: bool = True):
        if device:
            p.add_argument("--device", default="auto", help="torch device (auto = cuda when available, else cpu)")
        p.add_argument("--rows", type=common.POSITIVE_INT, default=16,
                       help="how many of the first --data rows to read")

    p = add("mechanisms", "sequence- vs token-level at the teacher's most uncertain position; forward vs reverse "
                          "KL on a bimodal toy")
    p.add_argument("--teacher", required=True, help="teacher model (hub id or folder)")
    p.add_argument("--student", required=True, help="student model sharing the teacher's vocabulary")
    p.add_argument("--data", required=True, help="generate_data.py JSONL whose completions are read")
    p.add_argument("--top", type=common.POSITIVE_INT, default=20, help="tokens shown per distribution")
    p.add_argument("--toy-steps", type=common.POSITIVE_INT, default=300,
                   help="Adam steps of the toy forward/reverse KL fits")
    add_models(p)

    p = add("alignment", "the ULD alignment of two tokenizations and the sorted top-K + tail at one pair")
    p.add_argument("--teacher", required=True, help="teacher model (its tokenizer differs from the student's)")
    p.add_argument("--student", required=True, help="student model")
    p.add_argument("--data", required=True, help="generate_data.py JSONL (the teacher's completions)")
    p.add_argument("--row", type=common.bounded(int, 0), default=None,
                   help="which row to draw (0-based; default: the one with the most misaligned tokens among --rows)")
    p.add_argument("--top-k", type=common.POSITIVE_INT, default=20, help="K of the sorted top-K + tail vectors")
    p.add_argument("--temperature", type=common.bounded(float, 0, low_open=True), default=2.0,
                   help="softmax temperature of the top-K vectors (cross_tokenizer.py's default: 2)")
    p.add_argument("--max-chars", type=common.POSITIVE_INT, default=90,
                   help="draw at most this many characters of the completion")
    add_models(p)

    p = add("inside", "logit lens, most-changed attention head and first answer token: base vs students")
    p.add_argument("--base", required=True, help="the students' base model (before distillation)")
    p.add_argument("--models", nargs="+", required=True,
                   help="distilled students (full model folders or LoRA adapter folders); same tokenizer as --base")
    p.add_argument("--labels", nargs="+", default=None, help="names for --models in the legends (default: folder)")
    p.add_argument("--data", required=True, help="generate_data.py JSONL, preferably held-out rows")
    p.add_argument("--top", type=common.POSITIVE_INT, default=12, help="first-answer tokens shown")
    p.add_argument("--layer", type=int, default=None,
                   help="the layer whose heads attention_layer.png draws (0-based, -1 = last; default: the layer "
                        "of the head that changed most from the base in any student)")
    add_models(p)

    p = add("stepmix", "on_policy.py's on- vs off-policy steps over training, from metrics.jsonl")
    p.add_argument("run", help="an on_policy.py output folder or its metrics.jsonl")
    args = parser.parse_args(argv)
    if args.command == "inside" and args.labels and len(args.labels) != len(args.models):
        parser.error(f"--labels: {len(args.labels)} names for {len(args.models)} --models")
    return args


# ----------------------------------------------------------------------------------------------------------------
# helpers


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def token_text(tokenizer, token_id: int) -> str:
    """A single token as readable text: spaces as '␣', newlines as '↵', special tokens by name."""
    token_id = int(token_id)
    if token_id in set(tokenizer.all_special_ids) or token_id >= len(tokenizer):
        text = tokenizer.convert_ids_to_tokens(token_id) or f"<{token_id}>"
    else:
        text, piece = tokenizer.decode([token_id]), tokenizer.convert_ids_to_tokens(token_id) or f"<{token_id}>"
        if not text or "\ufffd" in text:  # a byte-level piece of a multi-byte character
            text = piece.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n")
        elif piece.startswith("▁") and not text.startswith(" "):  # SentencePiece decode drops a leading space
            text = " " + text
    return visible(text)


def visible(text: str) -> str:
    """Text as drawn: spaces '␣', newlines '↵', tabs '⇥', other unprintable characters as escapes."""
    text = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("$", r"\$")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def save_figure(fig, out: Path, name: str, numbers: dict) -> dict:
    """Write NAME.png and NAME.json under `out`; print and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    png, data = out / f"{name}.png", out / f"{name}.json"
    fig.savefig(png, dpi=DPI)
    fig.clf()
    plot_metrics.pyplot().close(fig)
    data.write_text(json.dumps(numbers, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {png} and {data.name}")
    return {"png": png, "json": data}


def load_inspected(name: str, device: torch.device, what: str):
    """A model for inspection: float32, eval mode, eager attention (so attention weights can be returned). A LoRA
    adapter folder (adapter_config.json) is loaded onto its base model and merged."""
    folder = Path(name).expanduser()
    if (folder / "adapter_config.json").exists():
        try:
            from peft import PeftModel
        except ImportError:
            raise common.DistillError(f"{what} '{name}' is a LoRA adapter: reading it needs peft") from None
        base_name = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        model, tokenizer = models.load_model(base_name, dtype="float32", what=f"{what} (base of {name})")
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = models.load_tokenizer(str(folder), what=what)
    else:
        model, tokenizer = models.load_model(name, dtype="float32", what=what)
    model.set_attn_implementation("eager")
    model.eval().requires_grad_(False)
    return model.to(device), tokenizer


def final_norm(model) -> torch.nn.Module:
    """The norm applied before the output head (Llama/Qwen/Mistral `norm`, GPT-2 `ln_f`, ...)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    for attr in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        if isinstance(getattr(inner, attr, None), torch.nn.Module):
            return getattr(inner, attr)
    raise common.DistillError(f"cannot find the final norm of {type(model).__name__} for the logit lens")


def encode_batch(rows: list[dict], tokenizer, device) -> tuple[dict, list[dict]]:
    examples, _ = common.encode_rows(rows, tokenizer, MAX_LENGTH)
    batch = common.pad_batch(examples, tokenizer.pad_token_id)
    return {k: v.to(device) for k, v in batch.items()}, examples


def first_rows(data: str, n: int) -> list[dict]:
    return common.load_distill_rows(data)[:n]


# ----------------------------------------------------------------------------------------------------------------
# mechanisms


def toy_teacher(grid: torch.Tensor) -> torch.Tensor:
    """Logits of a bimodal teacher over the toy's 1-D 'vocabulary' of bins: two equal bumps at -2.5 and +2.5."""
    bumps = [torch.exp(-(grid - m) ** 2 / (2 * 0.6**2)) for m in (-2.5, 2.5)]
    return torch.log(0.5 * bumps[0] + 0.5 * bumps[1] + 1e-30)


def toy_fit(direction: str, *, steps: int = 300, lr: float = 0.05, init_mean: float = 1.0,
            init_std: float = 1.0) -> dict:
    """Fit a single Gaussian-shaped student, softmax(-(x - mean)^2 / (2 std^2)) over 121 bins in [-6, 6], to the
    bimodal `toy_teacher` with our own loss, `common.generalized_jsd_per_position` (beta 0 = forward KL,
    1 = reverse KL), by Adam on (mean, log std) from mean 1, std 1. Forward KL spreads over both modes; reverse KL
    settles on the nearer one (from mean 0 exactly, symmetry would leave it on a wide saddle between them)."""
    grid = torch.linspace(-6, 6, 121)
    teacher = toy_teacher(grid)
    mean = torch.tensor(float(init_mean), requires_grad=True)
    log_std = torch.tensor(math.log(init_std), requires_grad=True)
    optimizer = torch.optim.Adam([mean, log_std], lr=lr)
    beta = {"forward": 0.0, "reverse": 1.0}[direction]
    losses = []
    for _ in range(steps):
        student = -(grid - mean) ** 2 / (2 * log_std.exp() ** 2)
        loss = common.generalized_jsd_per_position(student, teacher, beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        student = F.softmax(-(grid - mean) ** 2 / (2 * log_std.exp() ** 2), -1)
    return {"direction": direction, "mean": mean.item(), "std": log_std.exp().item(), "loss": losses[-1],
            "losses": losses, "grid": grid.tolist(), "teacher_probs": F.softmax(teacher, -1).tolist(),
            "student_probs": student.tolist()}


def uncertain_position(teacher, student, rows, tokenizer, teacher_tokenizer, device) -> dict:
    """The completion position (over `rows`) where the teacher's next-token entropy at T=1 is highest, with both
    models' logits there (over the shared vocabulary)."""
    batch, _ = encode_batch(rows, tokenizer, device)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    vocab = checks.shared_vocab_size(tokenizer, teacher_tokenizer, s_logits.shape[-1], t_logits.shape[-1])
    mask = batch["loss_mask"][:, 1:].bool()
    entropy = torch.special.entr(F.softmax(t_logits[:, :-1, :vocab], -1)).sum(-1).masked_fill(~mask, -1.0)
    flat = int(entropy.flatten().argmax())
    row, pos = divmod(flat, entropy.shape[1])
    return {"row": row, "position": pos, "target": int(batch["input_ids"][row, pos + 1]),
            "entropy": float(entropy[row, pos]), "teacher_logits": t_logits[row, pos, :vocab],
            "student_logits": s_logits[row, pos, :vocab], "input_ids": batch["input_ids"][row, :pos + 1].tolist()}


def mechanisms(teacher: str, student: str, data: str, out: str | Path = "figures", *, rows: int = 16, top: int = 20,
               toy_steps: int = 300, device: str = "auto") -> dict:
    """The mechanisms figure: see the module docstring. Returns the paths and the numbers."""
    plt = plot_metrics.pyplot()
    device = resolve_device(device)
    t_model, t_tok = load_inspected(teacher, device, "--teacher")
    s_model, s_tok = load_inspected(student, device, "--student")
    chosen = uncertain_position(t_model, s_model, first_rows(data, rows), s_tok, t_tok, device)
    tl, sl = chosen["teacher_logits"], chosen["student_logits"]
    top = min(top, tl.shape[-1])
    ids = tl.topk(top).indices.tolist()
    labels = [token_text(s_tok, i) for i in ids]
    probs = {f"{who}_T{t:g}": F.softmax(logits / t, -1) for who, logits in (("teacher", tl), ("student", sl))
             for t in (1.0, 2.0)}
    argmax = int(tl.argmax())
    context = s_tok.decode(chosen["input_ids"][-24:])
    toys = {d: toy_fit(d, steps=toy_steps) for d in ("forward", "reverse")}

    fig, axes = plt.subplots(2, 2, figsize=(13, 8), layout="constrained")
    x = torch.arange(top).numpy()
    seq_ax, toy_ax, t1_ax, t2_ax = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    seq_ax.bar(x - 0.2, probs["teacher_T1"][ids].numpy(), 0.4, label="teacher's distribution (T=1)",
               color="tab:blue")
    seq_ax.bar(x + 0.2, [1.0 if i == argmax else 0.0 for i in ids], 0.4, color="tab:orange",
               label="sequence-level target: the argmax, one-hot")
    seq_ax.set(title="sequence-level: the teacher's choice, nothing else", ylabel="probability", ylim=(0, 1.05))
    for ax, t in ((t1_ax, 1.0), (t2_ax, 2.0)):
        ax.bar(x - 0.2, probs[f"teacher_T{t:g}"][ids].numpy(), 0.4, label=f"teacher, T={t:g}", color="tab:blue")
        ax.bar(x + 0.2, probs[f"student_T{t:g}"][ids].numpy(), 0.4, label=f"distilled student, T={t:g}",
               color="tab:green")
        ax.set(title=f"token-level: the whole distribution at T={t:g}", ylabel="probability")
    for ax in (seq_ax, t1_ax, t2_ax):
        ax.set_xticks(x, labels, rotation=60, fontsize=8)
        ax.legend(fontsize=8)
    grid = toys["forward"]["grid"]
    toy_ax.fill_between(grid, toys["forward"]["teacher_probs"], color="tab:blue", alpha=0.3, label="teacher")
    for d, color in (("forward", "tab:green"), ("reverse", "tab:red")):
        toy = toys[d]
        toy_ax.plot(grid, toy["student_probs"], color=color,
                    label=f"{d} KL fit: mean {round(toy['mean'], 2) + 0.0:+.2f}, std {toy['std']:.2f}")
    toy_ax.set(title=f"one Gaussian fitted to two modes with our loss ({toy_steps} Adam steps)",
               xlabel="toy 1-D vocabulary (121 bins)", ylabel="probability")
    toy_ax.legend(fontsize=8)
    fig.suptitle(f"teacher's most uncertain completion position (entropy {chosen['entropy']:.2f} nats, row "
                 f"{chosen['row']}): …{visible(context[-60:])} → ?   (the data's next token: "
                 f"{token_text(s_tok, chosen['target'])})", fontsize=10)
    numbers = {
        "teacher": teacher, "student": student, "data": data, "rows": rows,
        "row": chosen["row"], "position": chosen["position"], "entropy": chosen["entropy"],
        "data_next_token": chosen["target"], "teacher_argmax": argmax, "token_ids": ids, "tokens": labels,
        **{k: v[ids].tolist() for k, v in probs.items()},
        "toy": {d: {k: v for k, v in toy.items() if k not in ("grid", "teacher_probs", "losses")}
                for d, toy in toys.items()},
    }
    return {**save_figure(fig, Path(out), "mechanisms", numbers), "numbers": numbers}


# ----------------------------------------------------------------------------------------------------------------
# alignment


def _row_alignment(row: dict, s_tok, t_tok) -> dict | None:
    end_of_turn = not common.is_cut(row)
    s = common.encode_chat(s_tok, row["messages"], row["completion"], MAX_LENGTH, end_of_turn=end_of_turn)
    t = common.encode_chat(t_tok, row["messages"], row["completion"], MAX_LENGTH, end_of_turn=end_of_turn)
    if s is None or t is None:
        return None
    aligned = cross_tokenizer.align_by_end_offsets(s["completion_offsets"], t["completion_offsets"])
    misaligned = [i for i, j in enumerate(aligned) if s["completion_offsets"][i][1] != t["completion_offsets"][j][1]]
    return {"student": s, "teacher": t, "pairs": aligned, "misaligned": misaligned}


def alignment(teacher: str, student: str, data: str, out: str | Path = "figures", *, rows: int = 16,
              row: int | None = None, top_k: int = 20, temperature: float = 2.0, max_chars: int = 90,
              device: str = "auto") -> dict:
    """The alignment figure: see the module docstring. Returns the paths and the numbers."""
    plt = plot_metrics.pyplot()
    device = resolve_device(device)
    t_model, t_tok = load_inspected(teacher, device, "--teacher")
    s_model, s_tok = load_inspected(student, device, "--student")
    all_rows = common.load_distill_rows(data)
    chosen_rows = all_rows[:rows]
    _, _, stats = cross_tokenizer.encode_pairs(chosen_rows, s_tok, t_tok, MAX_LENGTH)
    if row is None:
        found = [(r, _row_alignment(x, s_tok, t_tok)) for r, x in enumerate(chosen_rows)]
        row, info = max(((r, a) for r, a in found if a), key=lambda ra: (len(ra[1]["misaligned"]), -ra[0]))
    else:
        if row >= len(all_rows):
            raise common.DistillError(f"--row {row}: --data has {len(all_rows)} rows")
        info = _row_alignment(all_rows[row], s_tok, t_tok)
        if info is None:
            raise common.DistillError(f"--row {row} is longer than {MAX_LENGTH} tokens")
    completion = all_rows[row]["completion"]
    s_enc, t_enc, pairs = info["student"], info["teacher"], info["pairs"]
    s_pos = [i for i, m in enumerate(s_enc["loss_mask"]) if m]
    t_pos = [i for i, m in enumerate(t_enc["loss_mask"]) if m]

    with torch.no_grad():
        s_logits = s_model(input_ids=torch.tensor([s_enc["input_ids"]], device=device)).logits[0].float()
        t_logits = t_model(input_ids=torch.tensor([t_enc["input_ids"]], device=device)).logits[0].float()
    s_pred = s_logits[[p - 1 for p in s_pos]]  # logits that predict each student completion token
    t_pred = t_logits[[t_pos[j] - 1 for j in pairs]]  # ... and its aligned teacher token
    t_entropy = torch.special.entr(F.softmax(t_pred, -1)).sum(-1)
    pair = int(t_entropy.argmax())
    k = min(top_k, s_logits.shape[-1] - 1, t_logits.shape[-1] - 1)
    p = cross_tokenizer.sorted_topk_with_tail(t_pred[pair], k, temperature)
    q = cross_tokenizer.sorted_topk_with_tail(s_pred[pair], k, temperature)
    uld = float(cross_tokenizer.uld_distance(p[None], q[None], kind="kl", temperature=temperature)[0])
    p_ids = (t_pred[pair] / temperature).topk(k).indices.tolist()
    q_ids = (s_pred[pair] / temperature).topk(k).indices.tolist()
    # --uld-match hybrid: the tokens both vocabularies hold, and the probability each side puts on them at T
    s_vocab, t_vocab = min(len(s_tok), s_pred.shape[-1]), min(len(t_tok), t_pred.shape[-1])
    match = cross_tokenizer.match_pair(s_tok, t_tok, s_vocab, t_vocab)
    t_matched = F.softmax(t_pred[:, :t_vocab] / temperature, -1)[:, match.teacher_ids.to(device)].sum(-1)
    s_matched = F.softmax(s_pred[:, :s_vocab] / temperature, -1)[:, match.student_ids.to(device)].sum(-1)
    same = cross_tokenizer.same_spans(s_enc["completion_offsets"], t_enc["completion_offsets"], pairs)
    vocab_match = {**match.shares(), "same_span_fraction": stats["same_span_fraction"],
                   "row_same_span": same, "teacher_matched_mass": t_matched.tolist(),
                   "student_matched_mass": s_matched.tolist()}

    def tokens(enc, tok, positions):
        return [{"id": enc["input_ids"][i], "text": token_text(tok, enc["input_ids"][i]), "start": s, "end": e,
                 "chars": completion[s:e]} for i, (s, e) in zip(positions, enc["completion_offsets"])]

    s_tokens, t_tokens = tokens(s_enc, s_tok, s_pos), tokens(t_enc, t_tok, t_pos)
    width = min(len(completion) + 1, max_chars)
    fig = plt.figure(figsize=(max(9.0, 0.17 * width + 1.5), 7.5), layout="constrained")
    top_ax, bars_ax = fig.subplots(2, 1, height_ratios=[1.1, 1])
    misaligned = set(info["misaligned"])

    def draw_row(items, y, color):
        for n, t in enumerate(items):
            if t["start"] >= width:
                break
            bad = y == 0 and n in misaligned
            span = max(t["end"] - t["start"], 0.3)
            top_ax.add_patch(plt.Rectangle((t["start"], y), span, 0.4, facecolor=color, alpha=0.35,
                                           edgecolor="red" if bad else "black", linewidth=1.8 if bad else 0.6))
            # the characters the token covers (what the alignment sees); a template's whitespace has an empty span
            text = "<eot>" if t["start"] >= len(completion) else visible(t["chars"]) or t["text"]
            top_ax.text(t["start"] + span / 2, y + 0.2, text, ha="center", va="center", fontsize=7,
                        family="monospace")

    draw_row(t_tokens, 1.2, "tab:blue")
    draw_row(s_tokens, 0.0, "tab:green")
    for i, j in enumerate(pairs):
        s, t = s_tokens[i], t_tokens[j]
        if s["start"] >= width or t["start"] >= width:
            continue
        xs = (s["start"] + max(s["end"] - s["start"], 0.3) / 2, t["start"] + max(t["end"] - t["start"], 0.3) / 2)
        top_ax.plot(xs, (0.4, 1.2), color="red" if i in misaligned else "gray", linewidth=1.5 if i in misaligned
                    else 0.7, alpha=0.9)
    if pair < len(s_tokens) and s_tokens[pair]["start"] < width:
        top_ax.annotate("pair below", (s_tokens[pair]["start"], -0.05), fontsize=7, color="purple", va="top")
    top_ax.set(xlim=(-0.5, width + 0.5), ylim=(-0.4, 1.8), yticks=[0.2, 1.4],
               yticklabels=[f"student\n{len(s_tokens)} tokens", f"teacher\n{len(t_tokens)} tokens"],
               xlabel="character of the completion (end-of-turn token = one virtual character past the end)")
    top_ax.set_title(
        f"row {row}: {len(s_tokens) - len(misaligned)} of {len(s_tokens)} student tokens end where their aligned "
        f"teacher token ends (red: they do not)\nover {stats['student_tokens']} student tokens of "
        f"{len(chosen_rows)} rows: {stats['exact_end_fraction']:.1%} end exactly, mean end gap "
        f"{stats['mean_end_gap_chars']:.2f} characters; {stats['same_span_fraction']:.1%} cover the same characters "
        f"(--uld-match hybrid compares those by token identity)\nvocabulary match: "
        f"{cross_tokenizer.describe_match(match)}; on this row at T={temperature:g} the teacher puts "
        f"{float(t_matched.mean()):.1%} of its probability on them, the student {float(s_matched.mean()):.1%}",
        fontsize=9)
    x = torch.arange(k + 1).numpy()
    bars_ax.bar(x - 0.2, p.tolist(), 0.4, color="tab:blue", label="teacher, sorted")
    bars_ax.bar(x + 0.2, q.tolist(), 0.4, color="tab:green", label="student, sorted")
    for n in range(min(k, 10)):  # the first ranks' tokens: which token holds each bucket differs between models
        bars_ax.text(n - 0.2, float(p[n]), token_text(t_tok, p_ids[n]), rotation=90, fontsize=6, ha="center",
                     va="bottom", family="monospace")
        bars_ax.text(n + 0.2, float(q[n]), token_text(s_tok, q_ids[n]), rotation=90, fontsize=6, ha="center",
                     va="bottom", family="monospace")
    bars_ax.set_xticks(x, [str(n + 1) for n in range(k)] + ["tail"], fontsize=7)
    s_pair, t_pair = s_tokens[pair], t_tokens[pairs[pair]]
    bars_ax.set(ylabel=f"probability at T={temperature:g}", xlabel="rank (token identity is not compared)",
                title=f"ULD at student token {pair} {s_pair['text']!r} ↔ teacher token {pairs[pair]} "
                      f"{t_pair['text']!r} (the pair where the teacher is least sure): top-{k} + tail, "
                      f"KL = {uld:.3f}", ylim=(0, max(float(p.max()), float(q.max())) * 1.25))
    bars_ax.title.set_fontsize(9)
    bars_ax.legend(fontsize=8)
    numbers = {"teacher": teacher, "student": student, "data": data, "row": row, "completion": completion,
               "student_tokens": s_tokens, "teacher_tokens": t_tokens, "pairs": pairs,
               "misaligned": info["misaligned"], "stats": stats, "pair": pair, "top_k": k,
               "temperature": temperature, "teacher_sorted": p.tolist(), "student_sorted": q.tolist(),
               "teacher_sorted_ids": p_ids, "student_sorted_ids": q_ids, "uld_kl": uld, "vocab_match": vocab_match}
    return {**save_figure(fig, Path(out), "alignment", numbers), "numbers": numbers}


# ----------------------------------------------------------------------------------------------------------------
# inside


def _lens_sums(model, out, batch: dict) -> tuple[torch.Tensor, int]:
    """Per hidden state (embeddings, then each layer): the summed probability of the reference next token over the
    completion positions, read through the final norm and the output head; and the number of positions.
    transformers' last hidden state already went through the final norm, so it is projected as is: its value is
    the model's own output."""
    mask = batch["loss_mask"][:, 1:].bool()
    targets = batch["input_ids"][:, 1:][mask]
    norm, head = final_norm(model), models.output_head(model)
    sums = []
    for n, hidden in enumerate(out.hidden_states):
        hidden = hidden[:, :-1][mask]
        if n < len(out.hidden_states) - 1:
            hidden = norm(hidden)
        probs = F.softmax(head(hidden).float(), -1)
        sums.append(probs.gather(-1, targets[:, None]).sum())
    return torch.stack(sums).cpu(), int(mask.sum())


def logit_lens(model, batch: dict) -> list[float]:
    """Mean probability of the reference next token at the completion positions of `batch` (input_ids,
    attention_mask, loss_mask), read from every hidden state through the final norm and the output head."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        sums, count = _lens_sums(model, out, batch)
    return (sums / count).tolist()


def _change_sums(base_attn, model_attn, batch: dict) -> torch.Tensor:
    """[layers, heads]: the L1 distance between the two models' attention rows, summed over the completion
    positions (the queries that predict a completion token)."""
    query = batch["loss_mask"][:, 1:].bool()
    query = torch.cat([query, torch.zeros_like(query[:, :1])], 1).float()  # [B, T]: position i predicts token i+1
    return torch.stack([((a.float() - b.float()).abs().sum(-1) * query[:, None]).sum((0, 2)).cpu()
                        for a, b in zip(base_attn, model_attn)])


def attention_change(base_attn, model_attn, batch: dict) -> torch.Tensor:
    """[layers, heads]: mean over the completion positions of sum_key |A_model - A_base| (0 = unchanged, 2 =
    disjoint). `*_attn`: the models' `output_attentions` on `batch`."""
    return _change_sums(base_attn, model_attn, batch) / batch["loss_mask"][:, 1:].sum().cpu()


def first_token_probs(model, tokenizer, rows: list[dict], device) -> torch.Tensor:
    """The mean next-token distribution right after each row's generation prompt (one prompt at a time)."""
    total = None
    with torch.no_grad():
        for row in rows:
            prompt = common.render_chat(tokenizer, row["messages"], add_generation_prompt=True)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1, :len(tokenizer)]
            probs = F.softmax(logits.float(), -1)  # over the tokenizer's ids (a head padded past them is cut)
            total = probs if total is None else total + probs
    return (total / len(rows)).cpu()


def first_answer_token(tokenizer, row: dict) -> int | None:
    """The first token of a row's completion as the model reads it after the generation prompt."""
    enc = common.encode_chat(tokenizer, row["messages"], row["completion"], end_of_turn=not common.is_cut(row))
    return next((t for t, m in zip(enc["input_ids"], enc["loss_mask"]) if m), None)


def first_token_shift(first: dict[str, torch.Tensor], top: int) -> dict:
    """The shift of the first answer token against the base: for each model but "base" in `first` (label -> [V]
    mean first-token distribution, `first_token_probs`), P_model - P_base on the `top` tokens whose probability
    moved most in any model (largest |shift|, in that order)."""
    base = first["base"]
    shifts = {label: probs - base for label, probs in first.items() if label != "base"}
    if not shifts:
        return {"token_ids": [], "shift": {}}
    moved = torch.stack([d.abs() for d in shifts.values()]).max(0).values  # [V]
    ids = moved.topk(min(top, moved.shape[0])).indices.tolist()
    return {"token_ids": ids, "shift": {label: d[ids].tolist() for label, d in shifts.items()},
            "base": base[ids].tolist()}


def attention_entropy(maps: torch.Tensor, queries: slice) -> list[float]:
    """[heads, T, T] attention of one layer -> per head, the mean entropy (nats) of the rows `queries` over all
    their keys."""
    rows = maps[:, queries].double()
    return torch.special.entr(rows).sum(-1).mean(-1).tolist()


def read_model(model, tokenizer, rows: list[dict], examples: list[dict], device, base=None) -> dict:
    """One model's numbers for `inside`, one row at a time (no padding; one row's attention maps in memory): its
    logit lens, its attention maps on the first row (own_maps), and with `base`, the per-head attention change from
    it and both models' maps on the first row."""
    lens, count, change, maps, own = 0, 0, 0, None, None
    with torch.no_grad():
        for n, ex in enumerate(examples):
            ids = torch.tensor([ex["input_ids"]], device=device)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                     "loss_mask": torch.tensor([ex["loss_mask"]], device=device)}
            out = model(input_ids=ids, output_hidden_states=True, output_attentions=base is not None or n == 0)
            if n == 0:  # this model's own maps on the first row, for the grid of one layer's heads
                own = [a[0].cpu() for a in out.attentions]
            sums, positions = _lens_sums(model, out, batch)
            lens, count = lens + sums, count + positions
            if base is None:
                continue
            base_attn = base(input_ids=ids, output_attentions=True).attentions
            if [a.shape for a in base_attn] != [a.shape for a in out.attentions]:
                base = None  # another architecture: no head-by-head comparison
                continue
            change = change + _change_sums(base_attn, out.attentions, batch)
            if n == 0:
                maps = ([a[0].cpu() for a in base_attn], [a[0].cpu() for a in out.attentions])
    found = {"lens": (lens / count).tolist(), "first": first_token_probs(model, tokenizer, rows, device),
             "own_maps": own}
    if base is not None:
        found.update(change=change / count, maps=maps)
    return found


def inside(base: str, models: list[str], data: str, out: str | Path = "figures", *, labels: list[str] | None = None,
           rows: int = 16, top: int = 12, layer: int | None = None, device: str = "auto") -> dict:
    """The five 'inside the students' figures: see the module docstring. Returns the paths and the numbers."""
    plt = plot_metrics.pyplot()
    device = resolve_device(device)
    labels = labels or [Path(m).name for m in models]
    data_rows = first_rows(data, rows)
    base_model, tokenizer = load_inspected(base, device, "--base")
    n_layers = base_model.config.num_hidden_layers
    if layer is not None and not -n_layers <= layer < n_layers:
        raise common.DistillError(f"--layer {layer}: the base has {n_layers} layers (0..{n_layers - 1}, or -1)")
    examples, _ = common.encode_rows(data_rows, tokenizer, MAX_LENGTH)
    found = {"base": read_model(base_model, tokenizer, data_rows, examples, device)}
    for name, label in zip(models, labels):
        model, tok = load_inspected(name, device, "--models")
        if tok.get_vocab() != tokenizer.get_vocab():
            raise common.DistillError(f"--models {name}: its tokenizer differs from --base's; inside compares "
                                      "models on the same tokens")
        found[label] = read_model(model, tok, data_rows, examples, device, base=base_model)
        del model
    positions = sum(sum(ex["loss_mask"][1:]) for ex in examples)

    numbers: dict = {"base": base, "models": dict(zip(labels, models)), "data": data, "rows": len(data_rows),
                     "positions": positions, "logit_lens": {k: v["lens"] for k, v in found.items()}, "heads": {}}
    paths = {}
    # logit lens
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for label, v in found.items():
        ax.plot(range(len(v["lens"])), v["lens"], marker="o", label=label, linestyle="--" if label == "base" else "-")
    ax.set_xticks(range(n_layers + 1), ["embed"] + [str(n) for n in range(1, n_layers + 1)])
    ax.set(xlabel="layer (hidden state read through the final norm and the output head)",
           ylabel="mean p(reference next token)", ylim=(0, 1.02),
           title=f"logit lens over {positions} completion tokens of {len(data_rows)} rows")
    ax.legend(fontsize=8)
    paths["logit_lens"] = save_figure(fig, Path(out), "logit_lens", numbers["logit_lens"])["png"]

    # most-changed attention head
    students = [label for label in found if "change" in found[label]]
    for label in found:
        if label != "base" and label not in students:
            print(f"{label}: its layers/heads differ from the base's; no attention comparison")
    fig, axes = plt.subplots(max(len(students), 1), 3, figsize=(10.5, 3.5 * max(len(students), 1)), squeeze=False,
                             layout="constrained", width_ratios=[0.6, 1, 1])
    length = len(examples[0]["input_ids"])
    window = min(length, 28)
    ticks = [token_text(tokenizer, i) for i in examples[0]["input_ids"][length - window:]]
    for row_axes, label in zip(axes, students):
        change, (base_maps, maps) = found[label]["change"], found[label]["maps"]
        layer, head = divmod(int(change.argmax()), change.shape[1])
        numbers["heads"][label] = {"layer": layer, "head": head, "change": change.tolist()}
        image = row_axes[0].imshow(change.numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
        row_axes[0].set(xlabel="head", ylabel="layer", title=f"{label} vs base:\nmean L1 change of attention rows",
                        xticks=range(change.shape[1]), yticks=range(change.shape[0]))
        row_axes[0].title.set_fontsize(9)
        fig.colorbar(image, ax=row_axes[0], shrink=0.8)
        for ax, who, pattern in ((row_axes[1], "base", base_maps), (row_axes[2], label, maps)):
            ax.imshow(pattern[layer][head, length - window:, length - window:].numpy(), cmap="Blues", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_title(f"{who}: layer {layer} head {head}\n(row 0, last {window} tokens; query ↓, key →)", fontsize=9)
            ax.set_xticks(range(window), ticks, rotation=90, fontsize=5, family="monospace")
            ax.set_yticks(range(window), ticks if ax is row_axes[1] else [], fontsize=5, family="monospace")
    for ax in axes.flat[3 * len(students):]:
        ax.axis("off")
    paths["attention_heads"] = save_figure(fig, Path(out), "attention_heads", numbers["heads"])["png"]

    # first answer token
    stacked = torch.stack([v["first"] for v in found.values()])  # [models, V]
    ids = stacked.max(0).values.topk(min(top, stacked.shape[1])).indices.tolist()
    # what the --data completions start with (the teacher's first tokens, as the base's tokenizer splits them)
    first_data = [first_answer_token(tokenizer, r) for r in data_rows]
    data_share = [sum(t == i for t in first_data) / len(first_data) for i in ids]
    series = [(label, v["first"][ids].tolist()) for label, v in found.items()] + [("--data completions", data_share)]
    fig, ax = plt.subplots(figsize=(min(11, 0.5 * len(ids) * len(series) ** 0.5 + 3), 4.2), layout="constrained")
    width = 0.8 / len(series)
    for n, (label, values) in enumerate(series):
        ax.bar([i + (n - (len(series) - 1) / 2) * width for i in range(len(ids))], values, width, label=label,
               hatch="//" if label == "base" else None, color="black" if label.startswith("--data") else None,
               alpha=0.5 if label.startswith("--data") else 1.0)
    ax.set_xticks(range(len(ids)), [token_text(tokenizer, i) for i in ids], rotation=45, fontsize=8,
                  family="monospace")
    ax.set(ylabel="mean probability", title="the first answer token (right after the generation prompt), "
                                            f"mean over {len(data_rows)} prompts")
    ax.legend(fontsize=8)
    numbers["first_token"] = {"token_ids": ids, "tokens": [token_text(tokenizer, i) for i in ids],
                              "probs": {k: v["first"][ids].tolist() for k, v in found.items()},
                              "data_first_tokens": first_data, "data_share": data_share}
    paths["first_token"] = save_figure(fig, Path(out), "first_token", numbers["first_token"])["png"]

    # the shift of the first answer token against the base
    shift = first_token_shift({k: v["first"] for k, v in found.items()}, top)
    shift["tokens"] = [token_text(tokenizer, i) for i in shift["token_ids"]]
    fig, ax = plt.subplots(figsize=(min(11, 0.5 * len(shift["token_ids"]) * len(found) ** 0.5 + 3), 4.2),
                           layout="constrained")
    width = 0.8 / max(len(shift["shift"]), 1)
    for n, (label, values) in enumerate(shift["shift"].items()):
        ax.bar([i + (n - (len(shift["shift"]) - 1) / 2) * width for i in range(len(values))], values, width,
               label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(shift["tokens"])), shift["tokens"], rotation=45, fontsize=8, family="monospace")
    ax.set(ylabel="ΔP = P(student) − P(base)", title="shift of the first answer token against the base (mean over "
                                                     f"{len(data_rows)} prompts; the tokens that moved most)")
    ax.legend(fontsize=8)
    numbers["first_token_shift"] = shift
    paths["first_token_shift"] = save_figure(fig, Path(out), "first_token_shift", shift)["png"]

    # every head of one layer, on the first row
    if layer is None:
        changes = [(float(found[s]["change"].max()), int(found[s]["change"].argmax()) // found[s]["change"].shape[1])
                   for s in students]
        layer = max(changes)[1] if changes else n_layers - 1
    layer %= n_layers
    shown = [label for label in found if len(found[label]["own_maps"]) == n_layers]
    heads = max(found[label]["own_maps"][layer].shape[0] for label in shown)
    window = min(length, 32)
    queries = slice(length - window, length)
    ticks = [token_text(tokenizer, i) for i in examples[0]["input_ids"][length - window:]]
    fig, axes = plt.subplots(len(shown), heads, figsize=(2.3 * heads + 1, 2.4 * len(shown) + 0.8), squeeze=False,
                             layout="constrained")
    # one colour scale for every panel, up to the largest weight shown (1 would wash out a diffuse layer)
    vmax = max(float(found[label]["own_maps"][layer][:, queries, queries].max()) for label in shown)
    grid = {"layer": layer, "window": window, "row_tokens": length, "vmax": vmax, "entropy": {}}
    for row_axes, label in zip(axes, shown):
        maps = found[label]["own_maps"][layer]  # [heads, T, T]
        grid["entropy"][label] = attention_entropy(maps, queries)
        for h, ax in enumerate(row_axes):
            if h >= maps.shape[0]:
                ax.axis("off")
                continue
            ax.imshow(maps[h, queries, queries].numpy(), cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"{label}: head {h}\nmean row entropy {grid['entropy'][label][h]:.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks(range(window) if h == 0 else [], ticks if h == 0 else [], fontsize=4, family="monospace")
    fig.suptitle(f"every head of layer {layer} on row 0 (last {window} of {length} tokens; query ↓, key →; "
                 f"colour 0 to {vmax:.2f})",
                 fontsize=10)
    numbers["attention_layer"] = grid
    paths["attention_layer"] = save_figure(fig, Path(out), "attention_layer", grid)["png"]
    inside_json = Path(out) / "inside.json"
    inside_json.write_text(json.dumps(numbers, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {**paths, "json": inside_json, "numbers": numbers}


# ----------------------------------------------------------------------------------------------------------------
# stepmix


def stepmix(run: str | Path, out: str | Path = "figures") -> dict:
    """on_policy.py's step mix: each step's loss marked on- or off-policy, and the running on-policy share."""
    plt = plot_metrics.pyplot()
    (label, metrics), = plot_metrics.load_runs([run]).items()
    steps = [m for m in metrics if isinstance(m.get("on_policy"), bool)]
    if not steps:
        raise common.DistillError(f"{run}: no step logs 'on_policy'; is it an on_policy.py run?")
    config = Path(run) / "run_config.json" if Path(run).is_dir() else Path(run).parent / "run_config.json"
    lmbda = json.loads(config.read_text()).get("lmbda") if config.exists() else None
    on = [m["on_policy"] for m in steps]
    share, count = [], 0
    for n, flag in enumerate(on, 1):
        count += flag
        share.append(count / n)
    fig, (loss_ax, share_ax) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    for kind, color in ((True, "tab:red"), (False, "tab:blue")):
        pts = [(m["step"], m["loss"]) for m in steps if m["on_policy"] is kind and "loss" in m]
        if pts:
            loss_ax.scatter(*zip(*pts), s=8, color=color, label=f"{'on' if kind else 'off'}-policy step "
                                                                  f"({sum(o is kind for o in on)})")
    loss_ax.set(xlabel="optimizer step", ylabel="loss", yscale="log", title=f"{label}: loss of each step by kind")
    loss_ax.legend(fontsize=8)
    share_ax.plot([m["step"] for m in steps], share, color="tab:red", label="on-policy share so far")
    share_ax.eventplot([[m["step"] for m in steps if m["on_policy"]]], lineoffsets=0.05, linelengths=0.06,
                       colors="tab:red", linewidths=0.5)
    if lmbda is not None:
        share_ax.axhline(lmbda, color="gray", linestyle="--", label=f"--lmbda {lmbda:g}")
    share_ax.set(xlabel="optimizer step", ylabel="share of steps", ylim=(0, 1.02),
                 title="on-policy steps (ticks) and their running share")
    share_ax.legend(fontsize=8)
    numbers = {"run": str(run), "lmbda": lmbda, "steps": len(on), "on_policy": sum(on),
               "off_policy": len(on) - sum(on), "on_policy_steps": [m["step"] for m in steps if m["on_policy"]]}
    return {**save_figure(fig, Path(out), "stepmix", numbers), "numbers": numbers}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.command == "mechanisms":
        return mechanisms(args.teacher, args.student, args.data, args.out, rows=args.rows, top=args.top,
                          toy_steps=args.toy_steps, device=args.device)
    if args.command == "alignment":
        return alignment(args.teacher, args.student, args.data, args.out, rows=args.rows, row=args.row,
                         top_k=args.top_k, temperature=args.temperature, max_chars=args.max_chars,
                         device=args.device)
    if args.command == "inside":
        return inside(args.base, args.models, args.data, args.out, labels=args.labels, rows=args.rows, top=args.top,
                      layer=args.layer, device=args.device)
    return stepmix(args.run, args.out)


if __name__ == "__main__":
    common.run_main(main)
