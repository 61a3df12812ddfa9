"""Generation and answer scoring: the decode loop (`generate`), the vLLM sampler, greedy answers to problems
(`answer_problems`) and their strict/lenient scoring with Wilson intervals."""

from __future__ import annotations

import argparse
import inspect
import math
import os

import torch

from common import POSITIVE_FRACTION, DistillError, end_of_turn_ids, nonfinite_logits_error, pad_batch, render_chat

# ----------------------------------------------------------------------------------------------------------------
# answer scoring (TrainLoop's --eval-problems, eval.py, demo.py)


# A number as written in a solution: an optional sign (ASCII '-' or the Unicode minus) touching it, an optional
# '$', digits with thousands separators and decimals. Not preceded by a word character, so identifiers such as
# 'x2' or 'Qwen2' hold no number. Whether the sign really is a sign is decided by `_is_sign` (it needs context).
_NUMBER = r"(?P<sign>[-\u2212])?(?P<body>(?:\$\s*)?(?<!\w)\d[\d,]*(?:\.\d+)?)"
# An operand ends here, so a '-' after it (spaces allowed) is the binary operator: '12 - 5', '(3+4)-2', '50%-5'.
_OPERAND_END = ")]}%"


def _is_sign(text: str, minus: int) -> bool:
    """Whether the '-' at `minus` (directly followed by the number) is a sign rather than a subtraction.

    A sign where it cannot be a binary operator: at the start; after an operator or opening punctuation such as
    '(', '=', ':', ',', '+', '*', '#' ('x = -3', '(-2)', '5 * -3', '#### -3'); after a word only with a space
    in between ('is -3', but 'n-5' and 'COVID-19' are not negative). Never after a number or a closing bracket
    or '%', with or without spaces ('12 - 5', '12 -5', '12-5', '(3)-5' all subtract).
    """
    before = text[:minus].rstrip()
    if not before:
        return True
    last = before[-1]
    if last.isdigit() or last in _OPERAND_END:
        return False
    if last.isalpha() or last == "_":
        return text[minus - 1].isspace()
    return True


def _number(text: str, match) -> str | None:
    sign = match.group("sign")
    negative = sign is not None and _is_sign(text, match.start("sign"))
    return _normalize_number(("-" if negative else "") + match.group("body"))


def extract_answer(text: str, *, strict: bool = False) -> str | None:
    """The final numeric answer of a solution, or None.

    strict: only an explicit final answer counts, '#### N' first, then \\boxed{N}; a reply without one (cut off
    mid-way, or that never states its answer) is None, so it scores as wrong. Lenient (strict=False): the same,
    then a fallback to the last number in the text, which also credits a reply that was cut off right after
    computing the right number, or ends on a number that merely looks like the answer. Report strict as the
    primary score; the gap to lenient measures how often answers lack the final format.

    A '-' counts as a sign only where it cannot be a subtraction (see `_is_sign`): 'She has 12 - 5 left' -> '5',
    '#### -3' -> '-3'. Normalized so that equal numbers compare equal as strings: thousands separators, '$',
    '%' and spaces are dropped and a trailing '.0' is removed ('$1,234.00' -> '1234').
    """
    import re

    for marker in (r"####\s*(?:\$\s*)?", r"\\boxed\{\s*(?:\$\s*)?"):
        match = re.search(marker + _NUMBER, text)
        if match:
            return _number(text, match)
    if strict:
        return None
    numbers = list(re.finditer(_NUMBER, text))
    return _number(text, numbers[-1]) if numbers else None


def _normalize_number(raw: str) -> str | None:
    cleaned = raw.replace(",", "").replace("$", "").replace("%", "").replace(" ", "").strip().rstrip(".")
    if not cleaned or cleaned == "-":
        return None
    if "." in cleaned:
        cleaned = cleaned.rstrip("0").rstrip(".")
    return "0" if cleaned in ("-0", "") else cleaned


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% with the default z = 1.96).

    With p = successes / n:  (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n).
    Preferred to the normal approximation p ± z·sqrt(p(1-p)/n), which collapses to a zero-width interval at 0%
    and 100%, can leave [0, 1], and undercovers for small n; Wilson's stays inside [0, 1] and keeps close to its
    nominal coverage there, which is where small held-out sets and weak students live. n == 0 -> (0.0, 1.0).
    """
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def judge_answer(prediction: str, reference: str | None) -> dict:
    """One prediction against its reference: the strict and lenient answers extracted from the prediction, the
    reference's answer (lenient rule: references are trusted data such as GSM8K's '#### N', None when it holds
    no number) and whether each matches. A problem without a reference number is never correct."""
    ref = extract_answer(reference) if reference is not None else None
    strict, lenient = extract_answer(prediction, strict=True), extract_answer(prediction)
    return {"strict": strict, "lenient": lenient, "reference": ref,
            "strict_ok": ref is not None and strict == ref, "lenient_ok": ref is not None and lenient == ref}


def score_answers(predictions: list[str], references: list[str | None]) -> dict:
    """Exact match of `predictions` against `references`, strict and lenient (see `extract_answer`).

    Only problems whose reference holds a number are scored; `n` counts them. Returns n, strict_correct and
    lenient_correct (counts), strict and lenient (fractions of n) and strict_ci and lenient_ci (Wilson 95%
    intervals, see `wilson_interval`). Raises DistillError when no reference holds a number.
    """
    if len(predictions) != len(references):
        raise DistillError(f"{len(predictions)} predictions for {len(references)} references")
    judged = [judge_answer(p, r) for p, r in zip(predictions, references)]
    judged = [j for j in judged if j["reference"] is not None]
    if not judged:
        raise DistillError("no problem has a reference answer with a number (check --answer-field)")
    n = len(judged)
    strict = sum(j["strict_ok"] for j in judged)
    lenient = sum(j["lenient_ok"] for j in judged)
    return {"n": n, "strict_correct": strict, "lenient_correct": lenient, "strict": strict / n,
            "lenient": lenient / n, "strict_ci": wilson_interval(strict, n), "lenient_ci": wilson_interval(lenient, n)}


# ----------------------------------------------------------------------------------------------------------------
# 9. generation (teacher data, on-policy samples, evaluation)


@torch.no_grad()  # not inference_mode: a model that updates a buffer here (dynamic RoPE) trains next
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids: list[int] | None = None, what: str = "the model") -> list[dict]:
    """Batched, left-padded sampling with a KV cache; stops as soon as every row has produced a stop token.
    Logits with NaN or inf raise DistillError naming the model (`what`, e.g. "--teacher") and the token: sampled
    from, they would give garbage that looks like text.

    Returns one dict per prompt: `tokens` (new tokens up to and including the first stop token) and `finished`
    (False when cut at max_new_tokens). Only the settings given here apply (temperature 0 = greedy; top-p
    nucleus sampling otherwise), not a repetition penalty or top_k a checkpoint's generation_config may carry.
    A plain decode loop rather than `model.generate`: on small models its per-token overhead is a third lower,
    which is most of on-policy distillation's cost; greedy output is identical (tests/test_on_policy.py).
    """
    stop_ids = stop_ids or end_of_turn_ids(tokenizer)
    device = next(model.parameters()).device
    batch = pad_batch([{"input_ids": p} for p in prompts], tokenizer.pad_token_id, side="left")
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: real tokens count from 0
    full_mask = torch.cat([mask, mask.new_ones(len(prompts), max_new_tokens)], dim=1)  # grown by slicing
    # a peft wrapper passes **kwargs on to the model it wraps, whose signature names the cache argument
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache_arg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    stops = torch.tensor(stop_ids, device=device)
    # Only real token ids are drawn: rows past len(tokenizer) pad the head (Qwen2.5: 151,936 rows for 151,665
    # tokens); a sample there decodes to nothing and indexes past the loss's vocabulary (on_policy.py).
    vocab = len(tokenizer)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        new_tokens = []
        for step in range(max_new_tokens):
            logits = out.logits[:, -1, :vocab].float()  # [B, V]
            # NaN/inf in a row still writing (amax propagates NaN); read at the sync below, not a second one
            nonfinite = ~(torch.isfinite(logits.amax(-1)) | finished).all()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                if top_p < 1:  # keep the smallest set of most likely tokens whose mass reaches top_p
                    sorted_probs, order = probs.sort(dim=-1, descending=True)
                    sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0
                    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
                # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race), cheaper than multinomial
                token = probs.div_(torch.empty_like(probs).exponential_()).argmax(-1)
            else:
                token = logits.argmax(-1)
            token = torch.where(finished, tokenizer.pad_token_id, token)
            new_tokens.append(token)
            finished |= torch.isin(token, stops)
            done, bad = torch.stack([finished.all(), nonfinite]).tolist()
            if bad:
                raise nonfinite_logits_error(what, f"at generated token {step + 1}")
            if done:
                break
            mask = full_mask[:, :mask.shape[1] + 1]
            positions = positions[:, -1:] + 1
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                        **{cache_arg: cache})
    finally:
        model.train(was_training)
    rows = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompts]
    results = []
    for row in rows:
        end = next((i for i, tok in enumerate(row) if tok in stop_ids), None)
        results.append({"tokens": row[:end + 1] if end is not None else row, "finished": end is not None})
    return results


def answer_problems(model, tokenizer, problems: list[dict], *, system_prompt: str, max_new_tokens: int,
                    batch_size: int, desc: str = "answer", what: str = "the model") -> list[str]:
    """Greedy replies to each problem's `prompt`, rendered with this tokenizer's own chat template (the same way
    generate_data.py renders prompts), decoded without special tokens. Used by eval.py and held-out evaluation
    during training. `what` names the model when its logits are not finite."""
    from tqdm.auto import tqdm

    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    stop_ids = end_of_turn_ids(tokenizer)
    texts = []
    for lo in tqdm(range(0, len(problems), batch_size), desc=desc, leave=False):
        prompts = [tokenizer(render_chat(tokenizer, [*system, {"role": "user", "content": p["prompt"]}],
                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"]
                   for p in problems[lo:lo + batch_size]]
        for result in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                               what=what):
            tokens = result["tokens"][:-1] if result["finished"] else result["tokens"]
            texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return texts


class VLLMSampler:
    """Optional vLLM backend for `generate` (--vllm): same inputs and outputs, at serving speed on a GPU.

    Used by generate_data.py (a fixed teacher) and on_policy.py (the student, whose new weights are pushed in with
    `load_weights` before every on-policy step). It runs vLLM in this process (V1 engine without its
    multiprocessing), tensor parallel size 1, next to the training model on the same GPU.
    """

    def __init__(self, model: str, *, dtype: str = "auto", gpu_memory_utilization: float = 0.3, seed: int = 0,
                 trust_remote_code: bool = False):
        try:
            import vllm
        except ImportError:
            raise DistillError("--vllm needs the vllm package (pip install vllm) and a CUDA GPU") from None
        if not torch.cuda.is_available():
            raise DistillError("--vllm needs a CUDA GPU; drop --vllm to sample with transformers")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keeps the engine reachable for weight sync
        self.vllm = vllm
        self.llm = vllm.LLM(model=model, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                            trust_remote_code=trust_remote_code, tensor_parallel_size=1)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop_ids: list[int]) -> list[dict]:
        from vllm.inputs import TokensPrompt

        params = self.vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                          top_p=top_p if temperature > 0 else 1.0, stop_token_ids=stop_ids,
                                          detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        stops, results = set(stop_ids), []
        for out in outputs:
            tokens = list(out.outputs[0].token_ids)
            end = next((i for i, tok in enumerate(tokens) if tok in stops), None)
            results.append({"tokens": tokens[:end + 1] if end is not None else tokens, "finished": end is not None})
        return results

    def load_weights(self, model) -> None:
        """Copy a (possibly peft-wrapped) Hugging Face model's current weights into the vLLM engine."""
        if hasattr(model, "merge_and_unload"):
            raise DistillError("--vllm with --lora is not supported: the adapter would have to be merged each step")
        engine = self.llm.llm_engine
        for path in ("model_executor.driver_worker.worker.model_runner.model",
                     "model_executor.driver_worker.model_runner.model",
                     "engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model"):
            target = engine
            for name in path.split("."):
                target = getattr(target, name, None)
                if target is None:
                    break
            if target is not None and hasattr(target, "load_weights"):
                target.load_weights(weights=((n, p.detach()) for n, p in model.state_dict().items()))
                return
        raise DistillError("this vLLM version does not expose the model for in-process weight loading; "
                           "use on_policy.py without --vllm")


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the optional vLLM sampling backend (generate_data.py, on_policy.py)."""
    parser.add_argument("--vllm", action="store_true",
                        help="sample with vLLM instead of transformers' generate (needs vllm and a CUDA GPU)")
    parser.add_argument("--vllm-gpu-memory", type=POSITIVE_FRACTION, default=0.3,
                        help="fraction of GPU memory vLLM may take (weights + KV cache)")
