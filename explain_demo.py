"""The interactive explainer's numbers (notebooks/explainer.py, `make notebook`): the notebook only calls these.

It reads a finished demo (demo.py's folder: the teacher, the two base students, the four runs and the held-out
teacher data) and gives, at one real completion position, what each method hands the student and the loss that
gives there (`method_targets`, float64, written from each script's formula), plus the demo's training curves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import cross_tokenizer
import generation
import plot_metrics
from explain import MAX_LENGTH, load_inspected, resolve_device, token_text

DEMO_RUNS = {"sequence-level": "sequence_level", "token-level": "token_level", "on-policy": "on_policy",
             "cross-tokenizer (ULD)": "cross_tokenizer"}
NO_DEMO = ("No demo output here: run `make demo` first (it writes demo_out/full/), or point the notebook at a demo "
           "folder: `marimo edit notebooks/explainer.py -- --demo DIR` or DISTILL_DEMO=DIR.")


def _is_demo(folder: Path) -> bool:
    return (folder / "teacher_final.json").is_file() and (folder / "dev_teacher_data.jsonl").is_file() and all(
        (folder / name / "config.json").is_file() for name in [*DEMO_RUNS.values(), "student_base",
                                                               "student_other_tokenizer_base"])


def find_demo(path: str | Path | None = None) -> Path | None:
    """The finished demo the explainer reads: `path` (demo.py's --out, or its full/ or quick/ folder), by default
    demo_out/ beside this file; full/ before quick/. None when none holds the teacher, the two base students, the
    four runs and the held-out teacher data."""
    root = Path(path) if path else Path(__file__).resolve().parent / "demo_out"
    return next((f for f in (root, root / "full", root / "quick") if _is_demo(f)), None)


def _logits_at(model, ids: list[int], positions: list[int], vocab: int, device) -> torch.Tensor:
    """[len(positions), vocab] float32 logits that predict the tokens at `positions` of `ids` (one sequence)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
    return logits[[p - 1 for p in positions], :vocab].float().cpu()


def explainer_positions(folder: str | Path, *, row: int = 0, max_new_tokens: int = 32, seed: int = 0,
                        device: str = "cpu") -> dict:
    """The real positions the explainer's sliders act on: one held-out row of the demo (dev_teacher_data.jsonl,
    the teacher's completion of a dev prompt), read by every model of the demo in one forward pass each.

    Returns: tokenizer (the teacher's, shared by the same-tokenizer students); tokens, targets: the completion's
    N tokens (text, ids); teacher [N, V]: the teacher's logits predicting each; entropy [N]: the teacher's at T=1;
    students: {"base", "sequence-level", "token-level", "on-policy"} -> [N, V] logits on the same prefixes;
    samples: {"base", "on-policy"} -> a completion that student sampled itself from the same prompt (T=1, `seed`,
    at most `max_new_tokens`) with "tokens", "teacher" and "student" [M, V] logits along it: where an on-policy
    step is trained; cross: {"tokenizer", "tokens", "targets": the other-tokenizer student's completion token
    aligned (closest end character, cross_tokenizer.align_by_end_offsets) to each teacher token, "base" and
    "cross-tokenizer (ULD)" -> [N, V_s] logits predicting those}."""
    folder, device = Path(folder), resolve_device(device)
    teacher_path = Path(json.loads((folder / "teacher_final.json").read_text())["path"])
    teacher_path = teacher_path if (teacher_path / "config.json").exists() else folder / teacher_path.name
    data_row = common.load_distill_rows(folder / "dev_teacher_data.jsonl")[row]
    end_of_turn = not common.is_cut(data_row)
    t_model, tok = load_inspected(str(teacher_path), device, "the demo's teacher")
    vocab = len(tok)
    enc = common.encode_chat(tok, data_row["messages"], data_row["completion"], MAX_LENGTH, end_of_turn=end_of_turn)
    positions = [i for i, m in enumerate(enc["loss_mask"]) if m]
    teacher = _logits_at(t_model, enc["input_ids"], positions, vocab, device)
    prompt = tok(common.render_chat(tok, data_row["messages"], add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    found = {"tokenizer": tok, "row": row, "targets": [enc["input_ids"][p] for p in positions],
             "tokens": [token_text(tok, enc["input_ids"][p]) for p in positions], "teacher": teacher,
             "entropy": torch.special.entr(F.softmax(teacher.double(), -1)).sum(-1), "students": {}, "samples": {}}
    for label, name in (("base", "student_base"), *((k, v) for k, v in DEMO_RUNS.items() if k != "cross-tokenizer "
                                                                                                  "(ULD)")):
        model, _ = load_inspected(str(folder / name), device, f"the demo's {label} student")
        found["students"][label] = _logits_at(model, enc["input_ids"], positions, vocab, device)
        if label in ("base", "on-policy"):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                drawn = generation.generate(model, tok, [prompt], max_new_tokens=max_new_tokens, temperature=1.0)
            ids = prompt + drawn[0]["tokens"]
            sampled = list(range(len(prompt), len(ids)))
            found["samples"][label] = {"tokens": [token_text(tok, ids[p]) for p in sampled],
                                       "teacher": _logits_at(t_model, ids, sampled, vocab, device),
                                       "student": _logits_at(model, ids, sampled, vocab, device)}
    cross = {}
    for label, name in (("base", "student_other_tokenizer_base"), ("cross-tokenizer (ULD)", "cross_tokenizer")):
        model, s_tok = load_inspected(str(folder / name), device, f"the demo's {label} other-tokenizer student")
        s_enc = common.encode_chat(s_tok, data_row["messages"], data_row["completion"], MAX_LENGTH,
                                   end_of_turn=end_of_turn)
        s_positions = [i for i, m in enumerate(s_enc["loss_mask"]) if m]
        partner = [s_positions[j] for j in cross_tokenizer.align_by_end_offsets(enc["completion_offsets"],
                                                                                s_enc["completion_offsets"])]
        cross[label] = _logits_at(model, s_enc["input_ids"], partner, len(s_tok), device)
        cross.update(tokenizer=s_tok, targets=[s_enc["input_ids"][p] for p in partner],
                     tokens=[token_text(s_tok, s_enc["input_ids"][p]) for p in partner])
    found["cross"] = cross
    return found


def method_targets(teacher_logits: torch.Tensor, student_logits: torch.Tensor, target: int, *, temperature: float,
                   beta: float, top_k: int, lmbda: float, alpha: float = 0.1, sample_teacher_logits=None,
                   sample_student_logits=None, cross_student_logits=None, cross_target: int | None = None,
                   cross_alpha: float = 0.5) -> dict:
    """What each method hands the student at one position, and the loss that gives there (float64).

    teacher_logits, student_logits: [V] at one completion position (same vocabulary); target: the data's token
    there (the teacher's own choice). beta: the divergence D_beta of `common.generalized_jsd_per_position`
    (0 = forward KL(teacher||student), 1 = reverse KL(student||teacher), else the generalized JSD), T^2-scaled.
      sequence-level  target: one-hot on `target`; loss CE = -log q(target) at T=1 (sequence_level.py)
      token-level     target: softmax(teacher/T); loss alpha * CE + (1 - alpha) * D_beta (token_level.py)
      on-policy       target: softmax(teacher/T) on the student's own sample (sample_*_logits [V], a step with
                      probability lmbda) or on the data (1 - lmbda); loss: the expectation over the step's kind,
                      lmbda * D_on + (1 - lmbda) * D_off (on_policy.py, no CE)
      cross-tokenizer target: the teacher's sorted top-K + tail at T, against the student's (cross_student_logits
                      [V_s], another vocabulary; cross_target its aligned token); loss cross_alpha * CE +
                      (1 - cross_alpha) * ULD-KL (cross_tokenizer.py --uld-match sorted, the blog's ULD)
    Each method's entry holds its "loss" and the arrays drawn: "target" and "student" distributions."""
    t, s = teacher_logits.double(), student_logits.double()
    log_q1 = F.log_softmax(s, -1)
    ce = -float(log_q1[target])
    p_t, q_t = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)

    def divergence(a, b):
        return float(common.generalized_jsd_per_position(b, a, beta, temperature))

    off = divergence(t, s)
    found = {
        "sequence-level": {"target": F.one_hot(torch.tensor(target), t.shape[-1]).double(), "student": log_q1.exp(),
                           "loss": ce, "ce": ce},
        "token-level": {"target": p_t, "student": q_t, "loss": alpha * ce + (1 - alpha) * off, "ce": ce,
                        "divergence": off, "alpha": alpha},
    }
    if sample_teacher_logits is not None:
        st, ss = sample_teacher_logits.double(), sample_student_logits.double()
        on = divergence(st, ss)
        found["on-policy"] = {"target": F.softmax(st / temperature, -1), "student": F.softmax(ss / temperature, -1),
                              "off_target": p_t, "off_student": q_t, "on_divergence": on, "off_divergence": off,
                              "loss": lmbda * on + (1 - lmbda) * off, "lmbda": lmbda}
    if cross_student_logits is not None:
        c = cross_student_logits.double()
        k = min(top_k, c.shape[-1] - 1, t.shape[-1] - 1)
        p = cross_tokenizer.sorted_topk_with_tail(t, k, temperature)
        q = cross_tokenizer.sorted_topk_with_tail(c, k, temperature)
        uld = float(cross_tokenizer.uld_distance(p[None], q[None], kind="kl", temperature=temperature)[0])
        cross_ce = -float(F.log_softmax(c, -1)[cross_target]) if cross_target is not None else 0.0
        found["cross-tokenizer (ULD)"] = {"target": p, "student": q, "top_k": k, "uld": uld, "ce": cross_ce,
                                          "loss": cross_alpha * cross_ce + (1 - cross_alpha) * uld,
                                          "alpha": cross_alpha}
    return found


def explainer_hands(positions: dict, position: int, *, student: str = "distilled", **settings) -> dict:
    """`method_targets` at completion position `position` of `explainer_positions`' row, for each method's own
    distilled student (student="distilled") or every method's starting point (student="base"); the on-policy
    sample's position is the same index, cut to the sample's length. settings: temperature, beta, top_k, lmbda."""
    def pick(label):
        return "base" if student == "base" else label

    sample = positions["samples"][pick("on-policy")]
    j = min(position, len(sample["tokens"]) - 1)
    hands = {}
    for label in ("sequence-level", "token-level", "on-policy"):
        found = method_targets(positions["teacher"][position], positions["students"][pick(label)][position],
                               positions["targets"][position], sample_teacher_logits=sample["teacher"][j],
                               sample_student_logits=sample["student"][j],
                               cross_student_logits=positions["cross"][pick("cross-tokenizer (ULD)")][position],
                               cross_target=positions["cross"]["targets"][position], **settings)
        hands[label] = found[label]
        hands["cross-tokenizer (ULD)"] = found["cross-tokenizer (ULD)"]
    hands["on-policy"]["sample_position"] = j
    return hands


def explainer_figure(hands: dict, positions: dict, position: int, *, top: int = 12):
    """The four methods side by side at one position: what each hands the student (target) beside what the student
    predicts there, on the teacher's `top` most likely tokens (cross-tokenizer: by rank)."""
    plt = plot_metrics.pyplot()
    tok = positions["tokenizer"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), layout="constrained")
    panels = [("sequence-level", "the teacher's token, one-hot (T=1)"),
              ("token-level", "the teacher's distribution at T"),
              ("on-policy", "the teacher's distribution at T on the student's own sample"),
              ("cross-tokenizer (ULD)", "sorted top-K + tail at T (token identity not compared)")]
    for ax, (label, what) in zip(axes.flat, panels):
        h = hands[label]
        if label == "cross-tokenizer (ULD)":
            n = h["top_k"] + 1
            ticks = [str(i + 1) for i in range(n - 1)] + ["tail"]
            ids = list(range(n))
        else:
            ref = h["target"] if label != "sequence-level" else hands["token-level"]["target"]
            ids = ref.topk(min(top, ref.shape[0])).indices.tolist()
            if label == "sequence-level" and int(h["target"].argmax()) not in ids:
                ids[-1] = int(h["target"].argmax())
            ticks = [token_text(tok, i) for i in ids]
        x = torch.arange(len(ids)).numpy()
        ax.bar(x - 0.2, h["target"][ids].numpy(), 0.4, color="tab:blue", label="handed to the student")
        ax.bar(x + 0.2, h["student"][ids].numpy(), 0.4, color="tab:green", label="the student")
        ax.set_xticks(x, ticks, rotation=60, fontsize=7, family="monospace")
        ax.set_title(f"{label}: {what}\nloss here {h['loss']:.3f}", fontsize=9)
        shown = max(float(h["target"][ids].max()), float(h["student"][ids].max()), 1e-9)
        ax.set_ylim(0, min(1.05, 1.2 * shown))  # a flat distribution's bars stay visible
        ax.legend(fontsize=7)
    context = "".join(positions["tokens"][max(0, position - 12):position])
    fig.suptitle(f"row {positions['row']}, completion token {position}: …{context} → {positions['tokens'][position]}"
                 f"  (teacher entropy {float(positions['entropy'][position]):.2f} nats)", fontsize=10)
    return fig


def kl_beta(kl: str, beta: float) -> float:
    """The D_beta of --kl/--beta, as the training scripts resolve them: forward 0, reverse 1, jsd `beta`."""
    return common.KL_BETA.get(kl, beta)


def hands_markdown(hands: dict) -> str:
    """One markdown table of `explainer_hands`: what each method hands the student here and the loss it gives."""
    seq, tok, on, uld = (hands[k] for k in ("sequence-level", "token-level", "on-policy", "cross-tokenizer (ULD)"))
    lines = ["| method | what it hands the student here | loss here |", "|---|---|---|",
             f"| sequence-level | the teacher's token, one-hot | CE {seq['ce']:.3f} |",
             f"| token-level | the teacher's distribution at T | {tok['alpha']:g} × CE {tok['ce']:.3f} + "
             f"{1 - tok['alpha']:g} × D {tok['divergence']:.3f} = {tok['loss']:.3f} |",
             f"| on-policy | the teacher's distribution at T on the student's own sample (token "
             f"{on['sample_position']}) with probability λ = {on['lmbda']:g}, else on the data | "
             f"{on['lmbda']:g} × D_on {on['on_divergence']:.3f} + {1 - on['lmbda']:g} × D_off "
             f"{on['off_divergence']:.3f} = {on['loss']:.3f} |",
             f"| cross-tokenizer (ULD) | the teacher's sorted top-{uld['top_k']} + tail at T | {uld['alpha']:g} × CE "
             f"{uld['ce']:.3f} + {1 - uld['alpha']:g} × ULD {uld['uld']:.3f} = {uld['loss']:.3f} |"]
    return "\n".join(lines)


def demo_curves(folder: str | Path) -> dict[str, list[dict]]:
    """Each demo run's metrics.jsonl rows, by method."""
    return {label: common.read_jsonl(Path(folder) / name / "metrics.jsonl") for label, name in DEMO_RUNS.items()
            if (Path(folder) / name / "metrics.jsonl").is_file()}


def curves_figure(runs: dict[str, list[dict]]):
    """The demo's real curves: training loss (each method's own), held-out loss, held-out exact match."""
    plt = plot_metrics.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    plot_metrics.draw(axes[0], runs, "loss", log_y=True)
    axes[0].set(title="training loss (each method's own)")
    plot_metrics.draw(axes[1], runs, "eval_loss", log_y=True)
    axes[1].set(title="held-out loss (each method's own)")
    plot_metrics.draw(axes[2], runs, "eval_exact_match")
    axes[2].set(title="held-out exact match (strict)", ylim=(-0.02, 1.02))
    return fig
