"""A teacher served by vLLM (`--teacher-url`): its top-K next-token log-probabilities at every completion position,
read from an OpenAI-compatible server's `/v1/completions` with `prompt_logprobs`, in the row format of a top-K
cache (cache_teacher.py), so a served teacher trains exactly like a `--store topk` cache.

    # the teacher on its own GPUs (the console script may be `vllm serve` too); bound k with --max-logprobs
    python -m vllm.entrypoints.openai.api_server --model Qwen/Qwen2.5-3B-Instruct --max-logprobs 64 --port 8000
    python cache_teacher.py --teacher Qwen/Qwen2.5-3B-Instruct --teacher-url http://teacher-host:8000 --top-k 64

One request per batch: the token ids of each row (prompt + completion, already rendered with the student's chat
template), `max_tokens` 1 and `prompt_logprobs` K. For every position i >= 1 vLLM returns the top K tokens of the
teacher's next-token distribution given tokens < i, at T = 1 (vLLM's raw log-probabilities, before any sampling
setting), plus the actual token's own. What is kept per completion position (topk_ids [n, K], topk_logprobs
[n, K], tail_logmass [n, 1]):

    tail_logmass = log(1 - sum_{top K} p) = log(-expm1(logsumexp(top-K log p)))

the T = 1 tail of a top-K cache. Only T = 1: a tempered tail log sum_tail p^(1/T) needs the tail's tokens one by
one, which the server does not return (see `check_temperature`).

On the wire: the request is the token ids (~6 bytes each as JSON), the answer ~K entries per token, each a JSON
object {"<id>": {"logprob", "rank", "decoded_token"}} of ~60-80 bytes: ~5 KB per token at K = 64 (the cache
stores 6 * K + 4 bytes of it).

Failures a network brings: refused connections (the server is not up yet, or went away), timeouts and 5xx answers
are retried with exponential backoff (`--teacher-retries`, `--teacher-timeout`), then stop the run with one line
(a DistillError); a 4xx answer (a bad request: too many log-probabilities for the server's --max-logprobs, a
prompt longer than its --max-model-len) stops at once with the server's message.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

import common

# Seconds before the first retry; doubled after each failed try, up to _MAX_BACKOFF.
_FIRST_BACKOFF = 1.0
_MAX_BACKOFF = 30.0


def add_teacher_url_args(parser: argparse.ArgumentParser, *, top_k: bool = True) -> None:
    """The served teacher's flags (cache_teacher.py, token_level.py, on_policy.py)."""
    parser.add_argument("--teacher-url", default=None,
                        help="an OpenAI-compatible vLLM server of the teacher (http://host:port): its top-K "
                             "log-probabilities at every completion token are fetched per batch instead of running "
                             "the teacher here (start it with --max-logprobs >= --teacher-top-k)")
    if top_k:
        parser.add_argument("--teacher-top-k", type=common.POSITIVE_INT, default=64,
                            help="with --teacher-url: teacher log-probabilities fetched per token (the rest of the "
                                 "vocabulary is one tail bucket, as in a top-K cache)")
    parser.add_argument("--teacher-retries", type=common.bounded(int, 0), default=5,
                        help="with --teacher-url: tries after a failed request (connection refused, timeout, 5xx), "
                             "with exponential backoff from 1 s, before the run stops")
    parser.add_argument("--teacher-timeout", type=common.bounded(float, 0, low_open=True), default=300.0,
                        help="with --teacher-url: seconds to wait for one answer")


def check_temperature(url: str, temperatures) -> None:
    """A server gives log-probabilities at T = 1 only: refuse others with one line."""
    other = [t for t in temperatures if not math.isclose(t, 1.0)]
    if other:
        raise common.DistillError(
            f"--teacher-url {url}: a served teacher gives its top-K log-probabilities at T=1 only, not "
            f"{', '.join(f'{t:g}' for t in other)}: the tempered tail sum_tail p^(1/T) needs every tail token, "
            "which the server does not return. Use --temperature 1, or a cache written from the local teacher "
            "(cache_teacher.py without --teacher-url), which holds the exact tempered tails")


class ServedTeacher:
    """A client of one vLLM server: `topk_rows` scores sequences, `check_tokenizer` compares its tokenizer with
    ours, `prefetch` keeps the next batch's request in flight."""

    def __init__(self, url: str, *, top_k: int, retries: int = 5, timeout: float = 300.0, model: str | None = None,
                 sleep=time.sleep):
        self.url, self.top_k, self.retries, self.timeout, self.sleep = url.rstrip("/"), top_k, retries, timeout, sleep
        self._model = model
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="served-teacher")
        self.bytes_received = 0

    # -- the wire ------------------------------------------------------------------------------------------------

    def _request(self, path: str, body: dict | None = None) -> dict:
        """POST `body` (GET when None) as JSON, with retries and backoff; the decoded answer."""
        data = None if body is None else json.dumps(body).encode()
        wait, last = _FIRST_BACKOFF, ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(wait)
                wait = min(2 * wait, _MAX_BACKOFF)
            request = urllib.request.Request(self.url + path, data=data,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                self.bytes_received += len(raw)
                return json.loads(raw)
            except urllib.error.HTTPError as error:
                detail = _error_message(error)
                if error.code < 500:  # our request is wrong: another try gets the same answer
                    raise common.DistillError(f"--teacher-url {self.url}: the server refused the request "
                                              f"(HTTP {error.code}: {detail}){_hint(detail)}") from None
                last = f"HTTP {error.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                reason = getattr(error, "reason", error)
                last = "timed out" if isinstance(reason, TimeoutError) else f"{type(reason).__name__}: {reason}"
            except json.JSONDecodeError as error:
                last = f"an answer that is not JSON ({error})"
        raise common.DistillError(f"--teacher-url {self.url}: no answer after {self.retries + 1} tries ({last}); "
                                  "is the vLLM server up and reachable? (--teacher-retries, --teacher-timeout)")

    @property
    def model(self) -> str:
        """The name the server serves its model under (the first of /v1/models)."""
        if self._model is None:
            self._model = self._request("/v1/models")["data"][0]["id"]
        return self._model

    # -- scoring -------------------------------------------------------------------------------------------------

    def topk_rows(self, sequences: list[list[int]], masks: list[list[int]]) -> list[dict[str, torch.Tensor]]:
        """The teacher's top-K at the positions each mask marks: for sequence s and mask m (same length), every
        index t with m[t] = 1 (t >= 1) gives the teacher's distribution over token t given s[:t]. One dict per
        sequence: topk_ids int64 [n, K], topk_logprobs float32 [n, K] (descending), tail_logmass float32 [n, 1]
        (log of the T = 1 tail), token_ids int64 [n] (s[t]); n = sum(m)."""
        answer = self._request("/v1/completions", {
            "model": self.model, "prompt": [list(map(int, s)) for s in sequences], "max_tokens": 1,
            "temperature": 1.0, "prompt_logprobs": self.top_k, "echo": False})
        choices = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != len(sequences):
            raise common.DistillError(f"--teacher-url {self.url}: {len(choices)} answers for {len(sequences)} "
                                      "sequences; is it a vLLM server?")
        return [self._parse(choice.get("prompt_logprobs"), seq, mask)
                for choice, seq, mask in zip(choices, sequences, masks)]

    def _parse(self, prompt_logprobs, sequence: list[int], mask: list[int]) -> dict[str, torch.Tensor]:
        if prompt_logprobs is None or len(prompt_logprobs) != len(sequence):
            raise common.DistillError(f"--teacher-url {self.url}: no prompt_logprobs for every token of a "
                                      f"{len(sequence)}-token prompt (got {len(prompt_logprobs or [])}); is it a "
                                      "vLLM server?")
        positions = [t for t, m in enumerate(mask) if m and t >= 1]
        ids = torch.zeros(len(positions), self.top_k, dtype=torch.long)
        logprobs = torch.zeros(len(positions), self.top_k, dtype=torch.float32)
        for row, t in enumerate(positions):
            # {"<id>": {"logprob", "rank", ...}}: the top K by rank, plus the actual token when it ranks lower
            entries = sorted(((int(token), e["logprob"], e.get("rank") or 0)
                              for token, e in (prompt_logprobs[t] or {}).items()), key=lambda e: (e[2], -e[1]))
            top = [e for e in entries if 1 <= e[2] <= self.top_k][:self.top_k]
            if len(top) < self.top_k:
                raise common.DistillError(
                    f"--teacher-url {self.url}: {len(top)} log-probabilities per token where {self.top_k} were "
                    f"asked for; start the server with --max-logprobs {self.top_k} or more, or lower the top-K flag")
            ids[row] = torch.tensor([e[0] for e in top])
            logprobs[row] = torch.tensor([e[1] for e in top], dtype=torch.float32)
        return {"topk_ids": ids, "topk_logprobs": logprobs, "tail_logmass": tail_logmass(logprobs)[:, None],
                "token_ids": torch.tensor([sequence[t] for t in positions], dtype=torch.long)}

    def prefetch(self, sequences: list[list[int]], masks: list[list[int]]):
        """`topk_rows` in a background thread: a Future whose `.result()` is its answer (or raises its error)."""
        return self._pool.submit(self.topk_rows, sequences, masks)

    def batch_rows(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """`topk_rows` of a padded training batch (input_ids, attention_mask, loss_mask [B, L])."""
        return self.topk_rows(*batch_request(batch))

    # -- checks --------------------------------------------------------------------------------------------------

    def check_tokenizer(self, tokenizer, *, what: str = "--student") -> None:
        """Before anything is trained: the server's tokenizer must give our token ids and its chat template the same
        tokens as ours (the positions we score are our template's). One line naming the first mismatch."""
        probe = "The answer is 12,345.67 - 8 = x; ünïcödé 東京 #### 42\n"
        ours = tokenizer(probe, add_special_tokens=False)["input_ids"]
        theirs = self._request("/tokenize", {"model": self.model, "prompt": probe,
                                             "add_special_tokens": False})["tokens"]
        if ours != theirs:
            raise common.DistillError(f"--teacher-url {self.url}: the server's vocabulary differs from {what}'s: "
                                      f"{probe!r} is {_diff(ours, theirs)}; a served teacher needs the same tokens")
        last = len(tokenizer) - 1
        theirs_last = self._request("/detokenize", {"model": self.model, "tokens": [last]}).get("prompt")
        ours_last = tokenizer.decode([last])
        if theirs_last != ours_last:
            raise common.DistillError(f"--teacher-url {self.url}: the server's vocabulary differs from {what}'s: "
                                      f"token {last} is {theirs_last!r} there, {ours_last!r} here")
        if not getattr(tokenizer, "chat_template", None):
            return
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                    {"role": "assistant", "content": "5"}]
        ours = tokenizer(common.render_chat(tokenizer, messages, add_generation_prompt=False),
                         add_special_tokens=False)["input_ids"]
        try:
            theirs = self._request("/tokenize", {"model": self.model, "messages": messages,
                                                 "add_generation_prompt": False, "add_special_tokens": False})["tokens"]
        except common.DistillError as error:
            raise common.DistillError(f"{error} (rendering a probe conversation with the server's chat template)") \
                from None
        if ours != theirs:
            raise common.DistillError(
                f"--teacher-url {self.url}: the server's chat template renders a probe conversation differently "
                f"from {what}'s: {_diff(ours, theirs)}; the teacher would score other text than the student reads")


def tail_logmass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_K p) from top-K log-probabilities [..., K] -> [...], computed as log(-expm1(logsumexp)) in
    float64; -inf where the K tokens hold all the mass (up to rounding)."""
    top = topk_logprobs.double().logsumexp(-1).clamp_max(0.0)
    return torch.log(-torch.expm1(top)).float()


def batch_request(batch: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """The unpadded token ids and loss masks of a right-padded training batch [B, L]."""
    sequences, masks = [], []
    for ids, attend, loss in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                 batch["loss_mask"].tolist()):
        n = sum(attend)
        sequences.append(ids[:n])
        masks.append(loss[:n])
    return sequences, masks


def stack_rows(rows: list[dict[str, torch.Tensor]], device=None) -> dict[str, torch.Tensor]:
    """One batch's teacher tensors in `cache_teacher.collate_rows`' topk layout (tail at T = 1): topk_ids [N, K],
    topk_logprobs [N, K], tail_logmass [N], in the order `common.shift_for_next_token` takes the positions."""
    return {"topk_ids": torch.cat([r["topk_ids"] for r in rows]).to(device),
            "topk_logprobs": torch.cat([r["topk_logprobs"] for r in rows]).to(device),
            "tail_logmass": torch.cat([r["tail_logmass"] for r in rows])[:, 0].to(device)}


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read() or b"{}")
        message = body.get("message") or body.get("error", {}).get("message") or body.get("detail") or body
    except (json.JSONDecodeError, AttributeError, OSError):
        message = error.reason
    return " ".join(str(message).split())[:300]


def _hint(detail: str) -> str:
    if "logprobs" in detail.lower():
        return "; start the server with a larger --max-logprobs, or lower the top-K flag"
    return ""


def _diff(ours: list[int], theirs: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return (f"tokens {ours[at:at + 4]} here and {theirs[at:at + 4]} on the server from token {at} "
            f"({len(ours)} and {len(theirs)} tokens)")
