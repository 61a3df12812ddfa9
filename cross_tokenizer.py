r"""Cross-tokenizer distillation (ULD): learn from a teacher whose vocabulary is different from the student's.

    # the blog's pair, every flag at its default: the SmolLM2-1.7B-Instruct teacher (another tokenizer than
    # Qwen's) for the Qwen2.5-0.5B student, on that teacher's own answers (first run
    # `python generate_data.py --teacher HuggingFaceTB/SmolLM2-1.7B-Instruct`, which writes
    # data/teacher_smollm2-1.7b-instruct.jsonl); hybrid matching, top-50 + tail at T=2, 50% cross-entropy; into
    # runs/cross_tokenizer. The blog's own loss (sorted ULD, no token identity) is `--uld-match sorted`
    python cross_tokenizer.py

    # another pair: the data must come from the same teacher
    python generate_data.py --teacher meta-llama/Llama-3.2-1B-Instruct   # -> data/teacher_llama-3.2-1b-instruct.jsonl
    python cross_tokenizer.py --teacher meta-llama/Llama-3.2-1B-Instruct --output-dir runs/uld_llama

    # from a teacher cache (`python cache_teacher.py --teacher HuggingFaceTB/SmolLM2-1.7B-Instruct`)
    python cross_tokenizer.py --teacher-cache data/teacher_smollm2-1.7b-instruct.top64 --output-dir runs/uld_cached
    # from an exact one (the same with `--store hidden`): the live teacher's loss at any --temperature
    python cross_tokenizer.py --teacher-cache data/teacher_smollm2-1.7b-instruct.hidden --output-dir runs/uld_exact

    # held-out ULD objective and CE every 50 steps (eval_loss, eval_ce, eval_div), keeping the best eval_loss
    python cross_tokenizer.py --eval-data data/teacher_smol_heldout.jsonl --eval-every 50 --save-best eval_loss \
        --output-dir runs/uld_eval

    # the ULD paper's loss (sorted L1 = closed-form Wasserstein-1, no token identity), several GPUs
    accelerate launch cross_tokenizer.py --uld-match sorted --uld-loss wasserstein --bf16 --output-dir runs/uld_w1

    # hybrid matching (the default) with reverse KL on the tokens both vocabularies hold
    python cross_tokenizer.py --kl reverse --output-dir runs/uld_hybrid_reverse

Token-level KL needs one vocabulary. ULD (Boizard et al., 2024, "Towards Cross-Tokenizer Distillation: the
Universal Logit Distillation Loss for LLMs") compares the *shape* of the two next-token distributions instead:

1. Alignment. Each model reads the conversation rendered by its *own* chat template. On the completion text only,
   every student token is paired with the teacher token whose end character offset is closest (ties: the earlier
   teacher token); the end-of-turn tokens are paired with each other. `align_by_end_offsets` does this.
2. Loss at each pair, `--uld-match sorted` (the ULD paper): the top-K probabilities of each side at temperature T,
   sorted in decreasing order, plus one tail bucket holding the mass outside the top K, so nothing vanishes:
   `--uld-loss kl` is KL(teacher || student) between the two (K+1)-vectors, `--uld-loss wasserstein` is
   sum_k |p_(k) - q_(k)| (both T^2-scaled). Sorting throws token identity away: the term is as content with a
   student sharply on a wrong token as on the right one.
   `--uld-match hybrid` (the default; after TRL's GOLD trainer) keeps identity where it exists. The tokens whose text
   both vocabularies hold are paired once per tokenizer pair (`vocabulary_match`: a byte-level 'Ġ' and a
   SentencePiece '▁' both read as a space, a byte token '<0x0A>' as its byte; the two end-of-turn tokens are paired
   too). At a pair whose student token covers exactly the characters of its teacher token (`same_spans`), both
   models predict from the same text and write the same text, so the matched tokens are compared by identity with
   token_level's divergence (`--kl forward|reverse|jsd`, `--beta`), plus one bucket for all other mass, and the
   unmatched rest of each distribution by the sorted top-K + tail above, weighted by the teacher's unmatched mass
   (`hybrid_uld_loss` has the formula). Pairs whose spans differ (a student token spanning several teacher tokens,
   or part of one) keep the sorted term: their teacher token is predicted after another prefix and writes other
   text, so identity there would teach the teacher's segmentation.
Total: alpha * CE (student's own tokens of the teacher's completion) + (1 - alpha) * ULD, each a sum over the
student's completion tokens divided by their number in the whole optimizer step.

The log reports how good the alignment is: the share of student tokens whose teacher partner ends at exactly the
same character, the mean end-offset gap in characters and the share that cover exactly the same characters; with
hybrid matching, how many tokens both vocabularies hold (alignment.json, and metrics.jsonl's matched_vocab_student
and matched_vocab_teacher) and, per step, the mean probability at T the teacher and the student put on them
(matched_mass_teacher, matched_mass_student). Held-out rows (--eval-data) are encoded and aligned the same way and
log eval_loss (this objective), eval_ce and eval_div (the ULD term; metrics.jsonl's div in training, the key every
script uses for its divergence term); from a --teacher-cache they must be cached too.

The teacher's side comes from the live --teacher or a --teacher-cache (teachers.py), through the same loop: a
hidden cache gives the live loss at any temperature (its hidden states and head); a top-K cache the teacher's
top-K log-probabilities and tail (`cache_teacher.cached_teacher_log_buckets`), where --uld-match hybrid can only
match the teacher's tokens among its cached top K (`hybrid_uld_from_topk` says what that leaves out) and loads the
teacher's tokenizer, not its model, to know which cached ids the student holds.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import re

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import cache_teacher
import checkpoints
import checks
import common
import losses
import models
import teachers
import training


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    method = common.add_train_args(parser, teacher=True, student_default=common.BLOG_STUDENT,
                                   teacher_default=common.ULD_TEACHER, output_dir="runs/cross_tokenizer")
    method.add_argument("--temperature", type=common.bounded(float, 0, low_open=True), default=2.0,
                        help="softmax temperature of the ULD term (> 0)")
    method.add_argument("--alpha", type=common.FRACTION, default=0.5,
                        help="weight of the student's cross-entropy (0..1); the ULD term gets 1 - alpha. 0.5 = "
                             "CE + ULD weighted equally, as in the ULD paper's code. The sorted comparison carries no "
                             "token identity, so with a small alpha it sharpens whatever the student already prefers "
                             "(the demo's student learned no answer line at alpha 0.1)")
    add_uld_args(method)
    common.add_divergence_args(method, default="forward")
    method.add_argument("--teacher-cache", default=None,
                        help="read the teacher from a cache_teacher.py folder instead of loading --teacher: "
                             "--store hidden gives the live teacher's loss exactly; --store topk its top-K log-probs "
                             "(compares the top min(--top-k, its K) + tail, exactly at the temperatures it holds)")
    method.add_argument("--min-exact-alignment", type=common.FRACTION, default=0.5,
                        help="warn when fewer student tokens than this share align to a teacher token ending at "
                             "the same character")
    args = parser.parse_args(argv)
    common.resolve_divergence(args, default="forward")
    training.check_eval_args(parser, args, stats=("ce", "div"))
    common.fill_train_defaults(parser, args)
    return args


def add_uld_args(group) -> None:
    """The ULD term's flags (--top-k, --uld-loss, --uld-match, --uld-weighting) on an argparse group: this script's
    and on_policy.py's with a teacher of another tokenizer. --kl/--beta (the identity divergence) and --temperature
    are each script's own."""
    group.add_argument("--top-k", type=common.POSITIVE_INT, default=50,
                       help="ULD term: probabilities compared per position (plus a tail); not a sampling setting")
    group.add_argument("--uld-loss", default="kl", choices=["kl", "wasserstein"],
                       help="the ULD distance, between *sorted* top-K + tail probability vectors (not token_level's "
                            "--kl, which compares token by token): kl = KL(teacher||student) of the sorted "
                            "vectors; wasserstein = sorted L1 (ULD paper)")
    group.add_argument("--uld-match", default="hybrid", choices=["sorted", "hybrid"],
                       help="how the ULD term compares the two distributions: sorted = the sorted top-K + tail of "
                            "each, no token identity (the ULD paper); hybrid = tokens both vocabularies hold (same "
                            "text after mapping each tokenizer's space marker and byte tokens) by identity with "
                            "--kl's divergence, plus one bucket for the rest, and the rest's sorted top-K + tail by "
                            "--uld-loss, where a student token covers the same characters as its teacher token "
                            "(sorted elsewhere); see hybrid_uld_loss")
    group.add_argument("--uld-weighting", default="mass", choices=["mass", "vocab"],
                       help="--uld-match hybrid: how the identity and sorted terms are weighted: mass = identity "
                            "term + the teacher's unmatched probability mass x sorted term (the chain rule of KL); "
                            "vocab = w x identity + (1 - w) x sorted with w = matched share of the teacher's "
                            "vocabulary (TRL GOLD)")


def align_by_end_offsets(student_offsets: list[tuple[int, int]], teacher_offsets: list[tuple[int, int]]) -> list[int]:
    """For each student token, the index of the teacher token whose end character offset is closest.

    Offsets are (start, end) character pairs relative to the same completion string, in token order (so the ends
    never decrease). Ties go to the earlier teacher token. One teacher index per student token.
    """
    if not teacher_offsets:
        raise ValueError("the teacher has no completion tokens to align to")
    ends = [end for _, end in teacher_offsets]
    aligned = []
    for _, end in student_offsets:
        right = bisect.bisect_left(ends, end)  # first teacher end >= this end
        if right == len(ends):
            aligned.append(len(ends) - 1)
        elif right == 0 or ends[right] == end:
            aligned.append(right)
        else:
            left = right - 1
            # bisect_left lands on the first of equal ends; on a tie in distance the left one is earlier.
            left = bisect.bisect_left(ends, ends[left])
            aligned.append(left if end - ends[left] <= ends[right] - end else right)
    return aligned


def same_spans(student_offsets, teacher_offsets, aligned: list[int]) -> list[bool]:
    """For each student token, whether its aligned teacher token covers exactly the same characters. Only then do
    both models predict from the same text and write the same text, so that comparing probabilities token by token
    means something: where a student token spans several teacher tokens (or part of one), its partner is predicted
    after a longer (or shorter) prefix, and its partner's token names other text (`--uld-match hybrid` compares such
    pairs by sorted ULD only)."""
    return [tuple(student_offsets[i]) == tuple(teacher_offsets[j]) for i, j in enumerate(aligned)]


def sorted_topk_with_tail(logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """[..., V] logits -> [..., K+1]: the top-K probabilities at temperature T (descending) and the rest's mass."""
    probs = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    top, index = probs.topk(k, dim=-1)  # sorted, descending
    # Summing what is left, rather than 1 - sum(top), avoids cancellation when the tail is small.
    tail = probs.scatter(-1, index, 0.0).sum(-1, keepdim=True)
    return torch.cat([top, tail], dim=-1)


def uld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, k: int, temperature: float,
             kind: str = "kl") -> torch.Tensor:
    """Per-position ULD distance between aligned positions, T^2-scaled. Shapes [N, V_s], [N, V_t] -> [N].

    With p = sorted top-K of softmax(teacher/T) + tail, q = the same for the student:
      kl:           T^2 * sum_k p_k (log p_k - log q_k)      (KL(teacher || student), the blog's choice)
      wasserstein:  T^2 * sum_k |p_k - q_k|                   (the ULD paper's closed-form Wasserstein-1)
    """
    # K stays below the smaller vocabulary so that both tails keep some mass (an empty tail opposite a non-empty
    # one would make KL infinite). Real vocabularies are far larger than K; this only matters for toy ones.
    k = min(k, student_logits.shape[-1] - 1, teacher_logits.shape[-1] - 1)
    return uld_distance(sorted_topk_with_tail(teacher_logits, k, temperature),
                        sorted_topk_with_tail(student_logits, k, temperature), kind=kind, temperature=temperature)


def uld_distance(p: torch.Tensor, q: torch.Tensor, *, kind: str, temperature: float) -> torch.Tensor:
    """[N, K+1] sorted teacher (p) and student (q) bucket vectors -> [N] distance, T^2-scaled (see uld_loss)."""
    if kind == "kl":
        tiny = torch.finfo(q.dtype).tiny
        d = torch.where(p > 0, p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log()), 0.0).sum(-1)
    else:
        d = (p - q).abs().sum(-1)
    return d * temperature**2


# ----------------------------------------------------------------------------------------------------------------
# Hybrid matching (--uld-match hybrid): token identity where both vocabularies hold the token, sorted ULD for the rest

# A large finite log-probability for an empty bucket (as cache_teacher's): its mass is 0 without -inf's NaN gradients.
_FLOOR = -1e30
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable Latin-1 bytes stand for themselves, the other bytes
    for the characters from U+0100 on, in order (so space is 'Ġ' and newline 'Ċ')."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + shifted)] = byte
            shifted += 1
    return alphabet


def _decoder_types(tokenizer) -> tuple[set[str], str]:
    """The types of the tokenizer's decoder pipeline (nested Sequences flattened) and the character that stands for
    a space in its tokens ('▁' unless a Metaspace or Replace decoder names another)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    types, space = set(), "▁"
    stack = [json.loads(decoder.__getstate__())] if decoder is not None else []
    while stack:
        node = stack.pop()
        types.add(node.get("type"))
        stack += node.get("decoders", [])
        if node.get("type") == "Metaspace":
            space = node.get("replacement", space)
        elif node.get("type") == "Replace" and node.get("content") == " ":
            space = node.get("pattern", {}).get("String", space)
    return types, space


def token_keys(tokenizer, vocab: int) -> list[tuple[object, bool]]:
    """For each token id below `vocab`: (what it writes, as a key both tokenizers share; whether it is a fallback).

    A byte-level BPE token (GPT-2, Llama 3, Qwen: a ByteLevel decoder) writes the bytes its characters stand for
    ('Ġ' is a space); a SentencePiece-style token writes its text with the space marker ('▁') as a space, and a
    byte-fallback token '<0x0A>' the one byte it names (such tokens are fallbacks: when a regular token writes the
    same bytes, that one is matched). The key of a text token is those bytes; a special token's is ("special",
    its text), so it only matches a special token of the same name, never text that spells it.
    """
    types, space = _decoder_types(tokenizer)
    byte_level = "ByteLevel" in types
    alphabet = _byte_level_alphabet() if byte_level else {}
    special = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    special.update((i, tokenizer.convert_ids_to_tokens(i)) for i in tokenizer.all_special_ids)
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    keys = []
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(vocab)))):
        if token_id in special:
            keys.append((("special", special[token_id]), False))
        elif token is None:  # a hole in the id range
            keys.append((("none", token_id), True))
        elif token_id in added:  # added text tokens are stored as written, not in the byte-level alphabet
            keys.append((added[token_id].encode(), False))
        elif byte_level and all(ch in alphabet for ch in token):
            keys.append((bytes(alphabet[ch] for ch in token), False))
        elif (byte := _BYTE_TOKEN.fullmatch(token)) is not None:
            keys.append((bytes([int(byte.group(1), 16)]), True))
        else:
            keys.append((token.replace(space, " ").encode(), False))
    return keys


@dataclasses.dataclass
class VocabMatch:
    """The tokens both vocabularies hold: student_ids[m] and teacher_ids[m] (LongTensor [n] each) write the same
    text; `student_vocab`/`teacher_vocab` are the real vocabulary sizes (padded head rows excluded)."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_vocab: int
    teacher_vocab: int

    def shares(self) -> dict[str, float]:
        n = len(self.student_ids)
        return {"matched_tokens": n, "matched_vocab_student": n / self.student_vocab,
                "matched_vocab_teacher": n / self.teacher_vocab}

    def teacher_to_student(self) -> torch.Tensor:
        """[teacher_vocab] LongTensor: the student id of each teacher token, -1 where the student has none."""
        table = torch.full((self.teacher_vocab,), -1, dtype=torch.long)
        table[self.teacher_ids] = self.student_ids
        return table


def vocabulary_match(student_tokenizer, teacher_tokenizer, student_vocab: int | None = None,
                     teacher_vocab: int | None = None, end_of_turn: tuple[int, int] | None = None) -> VocabMatch:
    """Pair the tokens that write the same text in both vocabularies (`token_keys`), one to one.

    Within one vocabulary several ids can write the same text (a byte-fallback token and a regular one): the regular
    one is paired, else the lowest id. `end_of_turn` = (student id, teacher id) pairs the two end-of-turn tokens
    whatever their names (the alignment pairs their positions too), unless either is already paired. Built once per
    tokenizer pair.
    """
    student_vocab = student_vocab or len(student_tokenizer)
    teacher_vocab = teacher_vocab or len(teacher_tokenizer)

    def first_id_per_key(keys):
        chosen = {}
        for fallback_pass in (False, True):  # regular tokens first
            for token_id, (key, fallback) in enumerate(keys):
                if fallback == fallback_pass and key not in chosen:
                    chosen[key] = token_id
        return chosen

    student = first_id_per_key(token_keys(student_tokenizer, student_vocab))
    teacher = first_id_per_key(token_keys(teacher_tokenizer, teacher_vocab))
    pairs = sorted((student[key], teacher[key]) for key in student.keys() & teacher.keys())
    if end_of_turn is not None:
        paired_s, paired_t = {s for s, _ in pairs}, {t for _, t in pairs}
        if end_of_turn not in pairs and end_of_turn[0] not in paired_s and end_of_turn[1] not in paired_t:
            pairs = sorted([*pairs, end_of_turn])
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return VocabMatch(ids[:, 0].contiguous(), ids[:, 1].contiguous(), student_vocab, teacher_vocab)


def _log_mass(masked: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """[N, V] logits / T with some set to -inf, the [N] logsumexp of all -> [N] log of the probability left in
    `masked` (_FLOOR where nothing is)."""
    return (masked.logsumexp(-1) - lse).clamp_min(_FLOOR)


def hybrid_uld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_ids: torch.Tensor,
                    teacher_ids: torch.Tensor, *, k: int, temperature: float, kind: str = "kl", beta: float = 0.0,
                    weighting: str = "mass") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position hybrid ULD, T^2-scaled: token identity where both vocabularies hold the token, sorted ULD for the
    rest. [N, V_s], [N, V_t], [n], [n] -> (loss [N], teacher matched mass [N], student matched mass [N]).

    p = softmax(teacher_logits / T), q = softmax(student_logits / T); student_ids[m] and teacher_ids[m] are the n
    matched tokens (`vocabulary_match`), U_t and U_s the unmatched rest of each vocabulary.
      matched term  D_M = D_beta(p_M, q_M) with p_M = (p[teacher_ids[0]], ..., p[teacher_ids[n-1]], p(U_t)) and
                    q_M = (q[student_ids[0]], ..., q(U_s)): the matched tokens compared by identity, plus one
                    bucket for all other mass; D_beta is token_level's divergence family
                    (`common.generalized_jsd_per_position`: beta 0 = forward KL(teacher || student), 1 = reverse
                    KL, else the generalized JSD; --kl, --beta). When one side has no unmatched token, both
                    buckets are left out (the matched tokens renormalized).
      sorted term   D_U = today's ULD (`uld_distance`, --uld-loss kl or wasserstein) between the sorted top-k + tail of
                    p restricted to U_t and renormalized (p(. | U_t)), and the same of q(. | U_s); k is capped below
                    the smaller unmatched set; 0 when either is empty.
      loss          T^2 * (D_M + p(U_t) * D_U)            weighting "mass" (the teacher's unmatched mass, no gradient)
                    T^2 * (w D_M + (1 - w) D_U), w = n / V_t  weighting "vocab" (TRL GOLD's overlap weights)
    With "mass" and forward KL the loss is exactly T^2 KL(p || q) if D_U were the identity-matched KL of the two
    conditionals (the chain rule over "matched token, or which unmatched one"); ULD replaces only that last part.
    Without shared tokens (n = 0) both weightings give `uld_loss` exactly; with every token shared, token_level's
    T^2 D_beta(p, q). Averaging is the caller's (a sum over positions / the step's token count). The masses returned
    (p(M) = 1 - p(U_t), q(M), at temperature T) are for logs. ULD: Boizard et al., 2024; the split into identity
    and sorted parts follows TRL's GOLD trainer (which weights them by vocabulary overlap and sorts full rows).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s_scaled, t_scaled = student_logits.to(dtype) / temperature, teacher_logits.to(dtype) / temperature
    s_lse, t_lse = s_scaled.logsumexp(-1), t_scaled.logsumexp(-1)
    # The unmatched tokens' logits / T ([N, V], matched ones -inf): their logsumexp is log p(U), their softmax p(.|U).
    s_unmatched = s_scaled.index_fill(-1, student_ids, float("-inf"))
    t_unmatched = t_scaled.index_fill(-1, teacher_ids, float("-inf"))
    s_rest, t_rest = _log_mass(s_unmatched, s_lse), _log_mass(t_unmatched, t_lse)
    masses = -torch.expm1(t_rest).detach(), -torch.expm1(s_rest).detach()  # p(M), q(M)
    if len(student_ids) == student_logits.shape[-1] or len(teacher_ids) == teacher_logits.shape[-1]:
        s_rest, t_rest = torch.full_like(s_rest, _FLOOR), torch.full_like(t_rest, _FLOOR)  # no bucket on one side
    s_buckets = torch.cat([s_scaled[:, student_ids] - s_lse[:, None], s_rest[:, None]], dim=-1)  # [N, n+1]
    t_buckets = torch.cat([t_scaled[:, teacher_ids] - t_lse[:, None], t_rest[:, None]], dim=-1)
    matched = common.generalized_jsd_per_position(s_buckets, t_buckets, beta, 1.0) * temperature**2
    k = min(k, student_logits.shape[-1] - len(student_ids) - 1, teacher_logits.shape[-1] - len(teacher_ids) - 1)
    if k >= 0:  # already divided by T: sorted at temperature 1
        unmatched = uld_distance(sorted_topk_with_tail(t_unmatched, k, 1.0), sorted_topk_with_tail(s_unmatched, k, 1.0),
                                 kind=kind, temperature=temperature)
    else:
        unmatched = torch.zeros_like(matched)
    if weighting == "mass":
        loss = matched + t_rest.exp() * unmatched
    else:
        w = len(teacher_ids) / teacher_logits.shape[-1]
        loss = w * matched + (1 - w) * unmatched
    return loss, *masses


def hybrid_uld_from_topk(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                         tail_logprob: torch.Tensor, teacher_to_student: torch.Tensor, student_ids: torch.Tensor, *,
                         k: int, temperature: float, kind: str = "kl", beta: float = 0.0,
                         weighting: str = "mass") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`hybrid_uld_loss` with the teacher read from a top-K cache (cache_teacher.py --store topk).

    [N, V_s] student logits, the cache's [N, K] token ids, [N, K] log-probabilities at T=1 (descending) and [N] tail
    log-mass, [V_t] teacher -> student ids (-1: unmatched; `VocabMatch.teacher_to_student`), [n] matched student ids
    -> (loss [N], teacher matched mass [N], student matched mass [N]), T^2-scaled. The cache names only the teacher's
    top K tokens, so the teacher's matched tokens are those among them ("named"):
      matched term  the named tokens by identity plus one bucket on each side for everything else (the student's:
                    its mass outside the named tokens' partners). This is the live matched term with the teacher's
                    matched tokens outside its top K merged into the bucket: exact when they hold no mass, otherwise
                    a coarser comparison (at T=1 never larger than the live term, by the data-processing inequality).
      sorted term   the teacher's unnamed top-K tokens sorted, the cached tail as their tail, renormalized, against the
                    student's unmatched tokens as in `hybrid_uld_loss`: the tail also holds whatever matched tokens
                    outside the top K weigh, counted here as unmatched mass.
      weights       as `hybrid_uld_loss`, with p(U_t) = the teacher's mass outside its named tokens.
    At T != 1 the cached log-probabilities are re-tempered with the tail as one token
    (`cache_teacher.cached_teacher_log_buckets`).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    top = topk_ids.shape[-1]
    teacher = cache_teacher.cached_teacher_log_buckets(topk_logprobs, tail_logprob, top, temperature).to(dtype)
    partner = teacher_to_student[topk_ids.long()]  # [N, K] student id of each cached teacher token, -1: none
    named = partner >= 0
    s_scaled = student_logits.to(dtype) / temperature
    s_lse = s_scaled.logsumexp(-1)
    # The student's mass outside the partners of the named tokens (scatter_add: several rows may hit id 0 via -1).
    hits = torch.zeros_like(s_scaled).scatter_add_(-1, partner.clamp_min(0), named.to(dtype)) > 0
    s_rest = _log_mass(s_scaled.masked_fill(hits, float("-inf")), s_lse)
    s_named = torch.where(named, s_scaled.gather(-1, partner.clamp_min(0)) - s_lse[:, None], _FLOOR)
    t_unnamed = torch.where(named, _FLOOR, teacher[:, :top])  # [N, K]
    t_rest = torch.cat([t_unnamed, teacher[:, top:]], dim=-1).logsumexp(-1).clamp_min(_FLOOR)
    t_named = torch.where(named, teacher[:, :top], _FLOOR)
    matched = common.generalized_jsd_per_position(torch.cat([s_named, s_rest[:, None]], dim=-1),
                                                  torch.cat([t_named, t_rest[:, None]], dim=-1), beta,
                                                  1.0) * temperature**2
    teacher_unmatched = int((teacher_to_student < 0).sum())
    k = min(k, top, student_logits.shape[-1] - len(student_ids) - 1, teacher_unmatched - 1)
    if k >= 0:
        ranked = t_unnamed.sort(dim=-1, descending=True).values
        tail = torch.cat([ranked[:, k:], teacher[:, top:]], dim=-1).logsumexp(-1, keepdim=True)
        p_u = F.softmax(torch.cat([ranked[:, :k], tail], dim=-1), dim=-1)  # renormalized within the unnamed mass
        q_u = sorted_topk_with_tail(student_logits.to(dtype).index_fill(-1, student_ids, float("-inf")), k,
                                    temperature)
        unmatched = uld_distance(p_u, q_u, kind=kind, temperature=temperature)
    else:
        unmatched = torch.zeros_like(matched)
    if weighting == "mass":
        loss = matched + t_rest.exp() * unmatched
    else:
        w = len(student_ids) / teacher_to_student.shape[0]
        loss = w * matched + (1 - w) * unmatched
    q_matched = -torch.expm1(_log_mass(s_scaled.index_fill(-1, student_ids, float("-inf")), s_lse)).detach()
    return loss, -torch.expm1(t_rest).detach(), q_matched


def chunked_uld_and_ce(student_hidden, student_weight, targets, num_tokens, *, teacher_hidden=None,
                       teacher_weight=None, teacher_probs=None, teacher_topk=None, alpha: float, top_k: int,
                       temperature: float, kind: str = "kl", chunk_size: int = 0, student_vocab: int | None = None,
                       teacher_vocab: int | None = None, match: VocabMatch | None = None, identity=None,
                       beta: float = 0.0, weighting: str = "mass"):
    """alpha * CE + (1 - alpha) * ULD, summed over aligned positions / num_tokens, chunk by chunk.

    The teacher is either live, `teacher_hidden` [N, H_t] with its head `teacher_weight`, or read from a cache:
    `teacher_probs` [N, k+1], its sorted bucket vectors (`cache_teacher.cached_teacher_log_buckets(...).exp()`,
    whose k then replaces `top_k`), or for the hybrid loss `teacher_topk` = (ids [N, K], log-probs [N, K], tail
    [N]), the top-K cache's rows (`top_k` must not exceed K). `kind` is --uld-loss. `student_vocab`/`teacher_vocab`:
    the tokenizers' sizes; head rows past them are padding, not tokens, and get no probability (default: every row).
    With `match` (--uld-match hybrid) the ULD term is `hybrid_uld_loss` (`hybrid_uld_from_topk` from a top-K cache;
    `beta` and `weighting` are theirs) at the positions where `identity` [N] is True (None: all) and the sorted ULD
    elsewhere. Each chunk's [C, V] logits are recomputed in backward (activation checkpointing) rather than kept, so
    memory is a few chunk-sized buffers; top-K selects K values per row, no full-vocabulary sort. Returns (loss,
    ce_sum, div_sum, mass_sums) with the sums detached for logging; mass_sums [2]: the teacher's and the student's
    probability on matched tokens summed over positions (`hybrid_uld_loss`'s masses; None without `match`).
    """
    live = teacher_hidden is not None and teacher_weight is not None
    if live + (teacher_probs is not None) + (teacher_topk is not None) != 1:
        raise ValueError("pass either teacher_hidden and teacher_weight, teacher_probs, or teacher_topk")
    if (teacher_topk is not None or identity is not None) and match is None:
        raise ValueError("teacher_topk and identity belong to the hybrid loss: pass match")
    student_weight = losses.full_weight(student_weight)[:student_vocab]
    if teacher_weight is not None:
        teacher_weight = teacher_weight[:teacher_vocab]
    teacher_rows_count = teacher_weight.shape[0] if teacher_weight is not None else 0
    chunk = chunk_size or losses.auto_chunk_size(max(student_weight.shape[0], teacher_rows_count))
    teacher_rows = (teacher_hidden,) if live else (teacher_probs,) if teacher_probs is not None else teacher_topk
    device = student_hidden.device
    if identity is None:
        identity = torch.ones(student_hidden.shape[0], dtype=torch.bool, device=device)
    if match is not None:
        student_ids, teacher_ids = match.student_ids.to(device), match.teacher_ids.to(device)
        if teacher_topk is not None:
            teacher_to_student = match.teacher_to_student().to(device)
    hybrid_options = dict(temperature=temperature, kind=kind, beta=beta, weighting=weighting)

    def piece(h, y, same, *rows):
        logits = h @ student_weight.T  # [C, V_s]
        ce = F.cross_entropy(logits.float(), y, reduction="sum")
        masses = ce.new_zeros(2)
        if teacher_probs is not None:  # rows: cached sorted teacher buckets [C, k+1]
            q = sorted_topk_with_tail(logits, rows[0].shape[-1] - 1, temperature)
            return ce, uld_distance(rows[0], q, kind=kind, temperature=temperature).sum(), masses
        if teacher_topk is not None:  # rows: the top-K cache's ids, log-probs, tail
            uld, p_matched, q_matched = hybrid_uld_from_topk(logits, *rows, teacher_to_student, student_ids,
                                                             k=top_k, **hybrid_options)
            if not same.all():
                other = ~same
                p = cache_teacher.cached_teacher_log_buckets(rows[1][other], rows[2][other], top_k, temperature)
                q = sorted_topk_with_tail(logits[other], top_k, temperature)
                uld = uld.masked_scatter(other, uld_distance(p.exp(), q, kind=kind, temperature=temperature))
            return ce, uld.sum(), torch.stack([p_matched.sum(), q_matched.sum()])
        with torch.no_grad():
            teacher_logits = rows[0] @ teacher_weight.T  # [C, V_t]
        if match is None:
            return ce, uld_loss(logits, teacher_logits, k=top_k, temperature=temperature, kind=kind).sum(), masses
        uld, p_matched, q_matched = hybrid_uld_loss(logits, teacher_logits, student_ids, teacher_ids, k=top_k,
                                                    **hybrid_options)
        if not same.all():  # a student token that does not cover its teacher token's characters: sorted ULD
            other = ~same
            uld = uld.masked_scatter(other, uld_loss(logits[other], teacher_logits[other], k=top_k,
                                                     temperature=temperature, kind=kind))
        return ce, uld.sum(), torch.stack([p_matched.sum(), q_matched.sum()])

    ce_sum = div_sum = student_hidden.new_zeros((), dtype=torch.float32)
    mass_sums = student_hidden.new_zeros(2, dtype=torch.float32)
    for lo in range(0, student_hidden.shape[0], chunk):
        part = slice(lo, lo + chunk)
        ce, uld, masses = checkpoint(piece, student_hidden[part], targets[part], identity[part],
                                     *(rows[part] for rows in teacher_rows), use_reentrant=False)
        ce_sum, div_sum, mass_sums = ce_sum + ce, div_sum + uld, mass_sums + masses
    loss = (alpha * ce_sum + (1 - alpha) * div_sum) / max(float(num_tokens), 1.0)
    return loss, ce_sum.detach(), div_sum.detach(), None if match is None else mass_sums.detach()


def uld_options(args) -> dict:
    """chunked_uld_and_ce's settings from this script's flags."""
    return dict(alpha=args.alpha, top_k=args.top_k, temperature=args.temperature, kind=args.uld_loss,
                chunk_size=args.chunk_size, beta=common.divergence_beta(args), weighting=args.uld_weighting)


def encode_pairs(rows, tokenizer, teacher_tokenizer, max_length, what: str | None = "--data", *,
                 truncated: str = "no-eos"):
    """Encode every row with both tokenizers (each with its own chat template) and align the completions.

    Adds to each student example `teacher_ids`, `teacher_targets` (for each student completion token, the index
    in `teacher_ids` of its aligned teacher token) and `same_span` (`same_spans`). Returns (examples, skipped,
    alignment stats). Rows cut at --max-new-tokens are encoded on both sides without the end-of-turn token, or left
    out (`truncated`, as in `common.encode_rows`).
    """
    examples, skipped, cut = [], 0, 0
    exact = gap = count = same = 0
    for index, row in enumerate(rows):
        if common.is_cut(row) and truncated == "skip":
            cut += 1
            continue
        with common.about_row(row, index, what):
            student = common.encode_chat(tokenizer, row["messages"], row["completion"], max_length,
                                         end_of_turn=not common.is_cut(row))
            teacher = common.encode_chat(teacher_tokenizer, row["messages"], row["completion"], max_length,
                                         end_of_turn=not common.is_cut(row))
        if student is None or teacher is None:
            skipped += 1
            continue
        teacher_positions = [i for i, m in enumerate(teacher["loss_mask"]) if m]
        aligned = align_by_end_offsets(student["completion_offsets"], teacher["completion_offsets"])
        student["teacher_ids"], student["row"] = teacher["input_ids"], index  # row: its place in `rows`
        student["teacher_targets"] = [teacher_positions[j] for j in aligned]
        student["same_span"] = same_spans(student["completion_offsets"], teacher["completion_offsets"], aligned)
        examples.append(student)
        same += sum(student["same_span"])
        for (_, s_end), j in zip(student["completion_offsets"], aligned):
            t_end = teacher["completion_offsets"][j][1]
            exact += s_end == t_end
            gap += abs(s_end - t_end)
            count += 1
    if not examples:
        raise common.DistillError(f"no row left to train on: {skipped} longer than --max-length {max_length} for one "
                                  f"of the tokenizers, {cut} cut at --max-new-tokens (--truncated skip)")
    stats = {"exact_end_fraction": exact / max(count, 1), "mean_end_gap_chars": gap / max(count, 1),
             "same_span_fraction": same / max(count, 1), "student_tokens": count}
    return examples, skipped, stats


def encode_from_cache(rows, tokenizer, cached: dict, max_length: int, held_out: bool = False, *,
                      truncated: str = "no-eos"):
    """Like encode_pairs, with the teacher's tokens read from a cache: its offsets give the alignment and each
    student example keeps its cached teacher row (teacher_row) and, per completion token, the position in it of its
    aligned teacher token (teacher_positions), read at collate time, and `same_span`. Training rows absent from the
    cache
    are skipped; held-out ones are refused (a held-out loss on a subset would mislead)."""
    examples, skipped, missing, differ = [], 0, 0, 0
    exact = count = same = 0
    for index, row in enumerate(rows):
        if common.is_cut(row) and truncated == "skip":
            continue  # counted in the end-of-run report
        with common.about_row(row, index, None if held_out else "--data"):
            student = common.encode_chat(tokenizer, row["messages"], row["completion"], max_length,
                                         end_of_turn=not common.is_cut(row))
        teacher = cached.get(row.get("id"))
        if student is None or teacher is None:
            skipped += student is None
            missing += student is not None
            continue
        if teacher["row_fingerprint"] != common.row_fingerprint(row):  # the id was cached for another row
            differ += 1
            continue
        teacher_offsets = [tuple(o) for o in teacher["offsets"].tolist()]
        aligned = torch.tensor(align_by_end_offsets(student["completion_offsets"], teacher_offsets))
        student.update(teacher_row=teacher, teacher_positions=aligned)
        student["same_span"] = same_spans(student["completion_offsets"], teacher_offsets, aligned.tolist())
        exact += sum(s_end == teacher_offsets[j][1] for (_, s_end), j in zip(student["completion_offsets"],
                                                                             aligned.tolist()))
        same += sum(student["same_span"])
        count += len(aligned)
        examples.append(student)
    if (missing or differ) and held_out:
        raise common.DistillError(f"{missing} rows are absent from --teacher-cache and {differ} were cached for "
                                  "another prompt or completion; score them into it: cache_teacher.py --data "
                                  "EVAL_DATA --output CACHE")
    if missing or differ:
        print(f"--teacher-cache: skipped {missing} rows absent from the cache and {differ} whose prompt or "
              "completion differ from the cached ones")
    if not examples:
        raise common.DistillError("--teacher-cache: no row of --data is in the cache")
    return examples, skipped, {"exact_end_fraction": exact / max(count, 1),
                               "same_span_fraction": same / max(count, 1), "student_tokens": count}


def collate_pairs(examples: list[dict], pad_id: int, teacher_pad_id: int) -> dict:
    """Pad both sides; `teacher_rows` [N] indexes the teacher's flattened hidden states, one per student target, and
    `identity` [N] (`same_span_mask`) says where --uld-match hybrid compares by token identity.

    The teacher position for target j is j - 1 (the position that predicts it), matching `shift_for_next_token`'s
    row-major order of the student's masked targets.
    """
    batch = common.pad_batch(examples, pad_id)
    teacher = common.pad_batch([{"input_ids": ex["teacher_ids"]} for ex in examples], teacher_pad_id)
    width = teacher["input_ids"].shape[1]
    rows = [b * width + j - 1 for b, ex in enumerate(examples) for j in ex["teacher_targets"]]
    batch.update(teacher_input_ids=teacher["input_ids"], teacher_attention_mask=teacher["attention_mask"],
                 teacher_rows=torch.tensor(rows, dtype=torch.long), identity=same_span_mask(examples))
    return batch


def same_span_mask(examples: list[dict]) -> torch.Tensor:
    """[N] bool: `same_span` of every student target, in `shift_for_next_token`'s row-major order."""
    return torch.tensor([flag for ex in examples for flag in ex["same_span"]], dtype=torch.bool)


def match_pair(tokenizer, teacher_tokenizer, student_vocab: int | None = None,
               teacher_vocab: int | None = None) -> VocabMatch:
    """--uld-match hybrid's matched tokens for a student/teacher pair: `vocabulary_match` with the two chat templates'
    end-of-turn tokens paired. What this script, doctor.py and explain.py's alignment report use."""
    student_vocab, teacher_vocab = student_vocab or len(tokenizer), teacher_vocab or len(teacher_tokenizer)
    ends = common.end_of_turn_ids(tokenizer)[0], common.end_of_turn_ids(teacher_tokenizer)[0]
    return vocabulary_match(tokenizer, teacher_tokenizer, student_vocab, teacher_vocab,
                            end_of_turn=ends if ends[0] < student_vocab and ends[1] < teacher_vocab else None)


def describe_match(match: VocabMatch) -> str:
    shares = match.shares()
    return (f"{shares['matched_tokens']} tokens write the same text in both vocabularies: "
            f"{shares['matched_vocab_student']:.1%} of the student's {match.student_vocab} and "
            f"{shares['matched_vocab_teacher']:.1%} of the teacher's {match.teacher_vocab}")


def build_match(tokenizer, teacher_tokenizer, student_vocab: int, teacher_vocab: int) -> VocabMatch:
    """`match_pair`, printed."""
    match = match_pair(tokenizer, teacher_tokenizer, student_vocab, teacher_vocab)
    print(f"vocabulary match: {describe_match(match)} (--uld-match hybrid compares them by identity)")
    return match


def print_alignment(alignment: dict, args, cached: bool = False) -> None:
    gap = "" if cached else f"; mean end-offset gap {alignment['mean_end_gap_chars']:.2f} characters"
    print(f"alignment: {alignment['exact_end_fraction']:.1%} of {alignment['student_tokens']} student tokens end "
          f"where their {'cached ' if cached else ''}teacher token ends{gap}; {alignment['same_span_fraction']:.1%} "
          "cover exactly the same characters" + (" (compared by token identity)" if args.uld_match == "hybrid" else ""))
    if alignment["exact_end_fraction"] < args.min_exact_alignment:
        print(f"warning: exact alignment {alignment['exact_end_fraction']:.1%} is below --min-exact-alignment "
              f"{args.min_exact_alignment:.0%}; the tokenizers segment this text very differently")


def step_stats(ce_sum, div_sum, mass_sums, num_tokens, held_out: bool) -> dict:
    """metrics.jsonl's terms of one micro-batch (summed over micro-batches and processes by the loop): ce, div and,
    with --uld-match hybrid, the mean probability the teacher and the student put on matched tokens (at T)."""
    stats = {"ce": ce_sum / num_tokens, "div": div_sum / num_tokens}
    if mass_sums is not None and not held_out:
        stats.update(matched_mass_teacher=mass_sums[0] / num_tokens, matched_mass_student=mass_sums[1] / num_tokens)
    return stats


def main(argv=None):
    args = parse_args(argv)
    manifest = cache_teacher.open_cache(args.teacher_cache, temperature=args.temperature) \
        if args.teacher_cache else None  # before any model
    rows = common.load_distill_rows(args.data, allow_duplicates=args.allow_duplicates)
    student, tokenizer = models.load_model(args.student, dtype=args.dtype, what="--student",
                                           trust_remote_code=args.trust_remote_code)
    # Padded head rows are not tokens: neither distribution gives them mass.
    student_vocab = min(len(tokenizer), models.output_head(student).weight.shape[0])
    if manifest is None:
        teacher_tokenizer, encode, collate, inputs = live_pairs(args, tokenizer)
    else:
        teacher_tokenizer, encode, collate, inputs, top_k = cached_pairs(args, tokenizer, manifest, student_vocab)
    examples, skipped, alignment = encode(rows)
    checks.check_unknown_targets(tokenizer, rows, examples)
    print_alignment(alignment, args, cached=manifest is not None)
    held_out = training.load_held_out(args, rows, tokenizer, encode=lambda eval_rows: encode(eval_rows, True)[:2])
    loop = training.TrainLoop(args, models.maybe_lora(student, args), examples, tokenizer.pad_token_id, collate,
                              held_out, inputs=inputs, models={"--student": "--dtype"} if manifest else
                              {"--student": "--dtype", "--teacher": "--teacher-dtype"})
    if manifest is None:
        teacher, _ = models.load_teacher(args, loop.device)
        source = teachers.LiveTeacher(teacher, inputs=("teacher_input_ids", "teacher_attention_mask"),
                                      select=lambda hidden, batch: hidden.flatten(0, 1)[batch["teacher_rows"]])
        teacher_vocab, top_k = min(len(teacher_tokenizer), source.weight.shape[0]), args.top_k
    else:
        source, teacher_vocab = teachers.from_cache(args.teacher_cache, manifest, loop.device), manifest["vocab"]
    match = build_match(tokenizer, teacher_tokenizer, student_vocab, teacher_vocab) \
        if args.uld_match == "hybrid" else None
    shares = match.shares() if match is not None else {}
    if loop.accelerator.is_main_process:
        (loop.output_dir / "alignment.json").write_text(json.dumps({**alignment, **shares}, indent=2) + "\n")
    head = models.output_head(loop.model)
    options = dict(uld_options(args), top_k=top_k, student_vocab=student_vocab, teacher_vocab=teacher_vocab)

    def objective(batch, num_tokens, held_out=False):  # training and held-out rows alike
        teacher = source(batch)
        hidden = models.student_hidden_states(loop.model, batch["input_ids"], batch["attention_mask"])
        student_hidden, targets = common.shift_for_next_token(hidden, batch)  # [N, H], [N]
        hybrid = dict(match=match, identity=batch["identity"]) if match is not None else {}
        loss, ce_sum, div_sum, mass_sums = chunked_uld_and_ce(student_hidden, head.weight, targets, num_tokens,
                                                              **teacher_side(teacher, match, args, top_k),
                                                              **hybrid, **options)
        return loss, step_stats(ce_sum, div_sum, mass_sums, num_tokens, held_out)

    # the objective's terms on the first batch; non-finite ones stop the run here
    training.preflight(loop, checks.objective_preflight(objective, "--teacher-cache" if manifest else "--teacher"))
    constant = {k: v for k, v in shares.items() if k != "matched_tokens"}  # matched_vocab_student/_teacher
    for micro_batches, num_tokens in loop:
        for batch in micro_batches:
            loss, stats = objective(batch, num_tokens)
            loop.backward(loss, **stats)
        loop.step(num_tokens, evaluate=objective, **constant)
    loop.finish(tokenizer, skipped=skipped, total=len(rows), rows=rows)


def teacher_side(teacher: dict, match: VocabMatch | None, args, top_k: int) -> dict:
    """chunked_uld_and_ce's teacher arguments from a source's side of a batch (teachers.py): the hidden states
    and head as they are; a top-K cache's rows as its ids, log-probabilities and tail (hybrid) or as the sorted
    bucket vectors at T (`cache_teacher.cached_teacher_log_buckets`, sorted ULD)."""
    if "cached_rows" not in teacher:
        return teacher
    rows = teacher["cached_rows"]
    if match is not None:
        return {"teacher_topk": (rows["topk_ids"], rows["topk_logprobs"], rows["tail_logmass"])}
    return {"teacher_probs": cache_teacher.cached_teacher_log_buckets(  # [N, k+1]
        rows["topk_logprobs"], rows["tail_logmass"], top_k, args.temperature).exp()}


def live_pairs(args, tokenizer):
    """With a live teacher: (its tokenizer, encode(rows, held_out=False) -> (examples, skipped, alignment),
    collate, what --resume compares). Both tokenizers encode every row (`encode_pairs`)."""
    teacher_tokenizer = models.load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code,
                                              what="--teacher")

    def encode(rows, held_out=False):
        return encode_pairs(rows, tokenizer, teacher_tokenizer, args.max_length, None if held_out else "--data",
                            truncated=args.truncated)

    inputs = checkpoints.live_teacher_inputs(args.teacher)
    inputs.ignored += ("min_exact_alignment",)  # a warning threshold, not what is trained
    return (teacher_tokenizer, encode,
            lambda exs: collate_pairs(exs, tokenizer.pad_token_id, teacher_tokenizer.pad_token_id), inputs)


def cached_pairs(args, tokenizer, manifest: dict, student_vocab: int):
    """With a cache_teacher.py folder (no teacher model loaded): as `live_pairs`, the teacher's tokens and rows
    read from the cache (`encode_from_cache`), plus the K compared per position (top-K store). --uld-match hybrid
    loads the teacher's tokenizer (`cached_teacher_tokenizer`), before the cache is read: a missing one fails fast;
    sorted needs none (None)."""
    teacher_tokenizer = cached_teacher_tokenizer(args, manifest) if args.uld_match == "hybrid" else None
    manifest, cached = cache_teacher.load_cache(args.teacher_cache)
    if any(row["row_fingerprint"] is None for row in cached.values()):
        raise common.DistillError(f"--teacher-cache {args.teacher_cache}: written by an older cache_teacher.py that "
                                  "did not record what each row was scored on; re-create it")
    top_k = args.top_k
    if cache_teacher.store_of(manifest) != "hidden":
        top_k = min(args.top_k, manifest["top_k"], student_vocab - 1)
        if top_k < args.top_k:
            print(f"--teacher-cache holds the top {manifest['top_k']}: comparing the top {top_k} (+ tail)")

    def encode(rows, held_out=False):
        return encode_from_cache(rows, tokenizer, cached, args.max_length, held_out, truncated=args.truncated)

    def collate(exs):  # one cached teacher position per student target, as collate_pairs' teacher_rows pick them
        return {**common.pad_batch(exs, tokenizer.pad_token_id), "identity": same_span_mask(exs),
                **cache_teacher.collate_rows([ex["teacher_row"] for ex in exs], manifest, args.temperature,
                                             [ex["teacher_positions"] for ex in exs])}

    inputs = cache_teacher.run_inputs(manifest)
    inputs.ignored += ("min_exact_alignment",)
    return teacher_tokenizer, encode, collate, inputs, top_k


def cached_teacher_tokenizer(args, manifest: dict):
    """The tokenizer of the teacher a cache was written with (its vocabulary fingerprint checked): the one the
    cache names, else --teacher. --uld-match hybrid needs it to know which of the cached token ids the student holds
    (only the tokenizer is loaded, not the model)."""
    tried = []
    for name in dict.fromkeys(n for n in (manifest.get("teacher"), args.teacher) if n):
        try:
            tokenizer = models.load_tokenizer(name, trust_remote_code=args.trust_remote_code, what="--teacher")
        except (common.DistillError, OSError, ValueError) as err:
            tried.append(f"'{name}' ({common.first_line(err)})")
            continue
        if cache_teacher.vocab_fingerprint(tokenizer) == manifest.get("vocab_fingerprint"):
            return tokenizer
        tried.append(f"'{name}' (another vocabulary)")
    raise common.DistillError(f"--teacher-cache {args.teacher_cache}: --uld-match hybrid needs the tokenizer of the "
                              f"teacher the cache was written with; tried {', '.join(tried)}. Pass that teacher as "
                              "--teacher, or use --uld-match sorted")


if __name__ == "__main__":
    common.run_main(main)
