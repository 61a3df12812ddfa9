"""generation.generate: greedy output identical to transformers' model.generate (plain, LoRA, eager attention, the
dynamic-cache fallback, a reused decode state), sampling that follows softmax(logits / T) and its top-p nucleus,
stop tokens read every few tokens, non-finite logits, padded head rows, and the model's train/eval state."""

from __future__ import annotations

import math

import pytest
import torch

import common
import generation
import models

QUESTIONS = ("Hi?", "What is 12 + 30, exactly? Show the steps.", "Ok", "Ana has 3 apples and buys 4 more, then 9.")


def chat_prompts(tok, questions=QUESTIONS) -> list[list[int]]:
    """Prompts of different lengths, so left padding differs per row."""
    return [tok(common.render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for q in questions]


def transformers_greedy(model, tok, prompts, max_new_tokens: int) -> list[list[int]]:
    from transformers import GenerationConfig

    batch = common.pad_batch([{"input_ids": p} for p in prompts], tok.pad_token_id, side="left")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=None)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         generation_config=config)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def ours_greedy(model, tok, prompts, max_new_tokens: int) -> list[list[int]]:
    results = generation.generate(model, tok, prompts, max_new_tokens=max_new_tokens, stop_ids=[10**9])  # never stops
    assert not any(r["finished"] for r in results)
    return [r["tokens"] for r in results]


# 21 tokens: not a multiple of the stop-check interval, so the last stretch is a partial one
NEW = 2 * generation.STOP_CHECK_EVERY + 5


@pytest.mark.parametrize("name", ["student", "student_llama3", "student_nosys"])
def test_greedy_matches_transformers_generate(kit, name):
    model, tok = models.load_model(str(kit[name]))
    prompts = chat_prompts(tok)
    assert len({len(p) for p in prompts}) > 2
    assert ours_greedy(model, tok, prompts, NEW) == transformers_greedy(model, tok, prompts, NEW)


def test_greedy_matches_transformers_generate_with_eager_attention(kit):
    """Eager attention adds the mask to the scores (0 / the dtype's min) where sdpa takes a boolean one."""
    model, tok = models.load_model(str(kit["student"]))
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    prompts = chat_prompts(tok)
    assert ours_greedy(model, tok, prompts, NEW) == transformers_greedy(model, tok, prompts, NEW)


def test_greedy_matches_on_the_dynamic_cache_fallback(kit, monkeypatch):
    """Models the static path does not describe (sliding-window layers, flash attention) decode on a DynamicCache."""
    model, tok = models.load_model(str(kit["student"]))
    prompts = chat_prompts(tok)
    theirs = transformers_greedy(model, tok, prompts, NEW)
    monkeypatch.setattr(generation, "_static_cache_fits", lambda model: False)
    assert ours_greedy(model, tok, prompts, NEW) == theirs


def test_sliding_window_layers_take_the_dynamic_path(kit):
    model, _ = models.load_model(str(kit["student"]))
    assert generation._static_cache_fits(model)
    model.config.layer_types = ["sliding_attention", "full_attention"]
    assert not generation._static_cache_fits(model)


def test_greedy_matches_with_a_lora_adapter_and_the_train_state_comes_back(kit):
    from peft import LoraConfig, get_peft_model

    model, tok = models.load_model(str(kit["student"]))
    prompts = chat_prompts(tok)
    base = ours_greedy(model, tok, prompts, NEW)
    # random A and B (not peft's B = 0), so the adapter changes what the model says
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                                            lora_dropout=0.1, init_lora_weights=False))
    lora.train()
    ours = ours_greedy(lora, tok, prompts, NEW)
    assert all(m.training for m in lora.modules())  # train() state restored, dropout included
    lora.eval()
    assert ours == transformers_greedy(lora, tok, prompts, NEW)
    assert ours != base
    ours_greedy(lora, tok, prompts, 3)
    assert not any(m.training for m in lora.modules())  # and eval() stays eval()


def test_a_reused_decode_state_gives_what_a_fresh_one_gives(kit, monkeypatch):
    """On CUDA one `_Decoder` (its static cache, buffers and captured step) serves every call of the same shape,
    reset in place. Simulated on CPU: the same caching, with the captured step replayed as an eager step."""
    model, tok = models.load_model(str(kit["student"]))
    prompts = chat_prompts(tok)
    fresh = [ours_greedy(model, tok, prompts, NEW), ours_greedy(model, tok, prompts[::-1], NEW)]

    class Replay:  # stands in for the CUDA graph
        def __init__(self, decoder, model):
            self.decoder, self.model, self.replays = decoder, model, 0

        def replay(self):
            self.replays += 1
            self.decoder._step(self.model)

    def capture(self, model, steps_left):
        self._step(model)
        self.graph = Replay(self, model)
        return 1

    monkeypatch.setattr(generation, "_graphs_fit", lambda model, device: True)
    monkeypatch.setattr(generation._Decoder, "_capture", capture)
    first = ours_greedy(model, tok, prompts, NEW)
    decoder = generation._DECODERS["by_model"][model]
    # the second batch has other prompts in other rows (another padding) and reuses the same decoder
    second = ours_greedy(model, tok, prompts[::-1], NEW)
    assert generation._DECODERS["by_model"][model] is decoder and decoder.graph.replays > NEW
    assert decoder.cache_len % generation._CACHE_LEN_MULTIPLE == 0
    assert [first, second] == fresh
    # prompts too long for its cache get a new (longer) one; so does another batch size
    long = chat_prompts(tok, [q * 40 for q in QUESTIONS])
    assert max(map(len, long)) + NEW > decoder.cache_len
    assert ours_greedy(model, tok, long, NEW) == transformers_greedy(model, tok, long, NEW)
    longer = generation._DECODERS["by_model"][model]
    assert longer is not decoder and longer.cache_len >= max(map(len, long)) + NEW
    assert ours_greedy(model, tok, prompts, NEW) == fresh[0]  # shorter prompts fit the longer cache
    assert generation._DECODERS["by_model"][model] is longer
    ours_greedy(model, tok, prompts[:2], NEW)
    assert generation._DECODERS["by_model"][model] is not longer


def greedy_rows(model, tok, prompts, n: int) -> list[list[int]]:
    return [r["tokens"] for r in generation.generate(model, tok, prompts, max_new_tokens=n, stop_ids=[-1])]


def test_stop_tokens_end_each_row_and_rows_finish_at_different_times(kit):
    model, tok = models.load_model(str(kit["student"]))
    prompts = chat_prompts(tok)
    n = 3 * generation.STOP_CHECK_EVERY + 3
    free = greedy_rows(model, tok, prompts, n)
    # a stop token row 0 first says at its 3rd token: row 0 ends early, the others where (if) they say it
    stop = free[0][2]
    assert stop not in free[0][:2]
    results = generation.generate(model, tok, prompts, max_new_tokens=n, stop_ids=[stop])
    ends = [row.index(stop) if stop in row else None for row in free]
    assert any(end is None for end in ends)  # some row runs to max_new_tokens meanwhile
    for row, end, result in zip(free, ends, results):
        if end is None:
            assert result == {"tokens": row, "finished": False}
        else:
            assert result == {"tokens": row[:end + 1], "finished": True}


def test_the_loop_stops_soon_after_every_row_has_finished(kit):
    model, tok = models.load_model(str(kit["student"]))
    prompts = chat_prompts(tok)[:1]
    free = greedy_rows(model, tok, prompts, 4)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    result = generation.generate(model, tok, prompts, max_new_tokens=200, stop_ids=[free[0][1]])[0]
    assert result == {"tokens": free[0][:2], "finished": True}
    # the prefill, then decode steps up to the first check after the stop token (not 200)
    assert len(forwards) <= 1 + generation.STOP_CHECK_EVERY


@pytest.mark.parametrize("n", [1, 2, generation.STOP_CHECK_EVERY, generation.STOP_CHECK_EVERY + 1])
def test_max_new_tokens_is_exact(kit, n):
    model, tok = models.load_model(str(kit["student"]))
    results = generation.generate(model, tok, chat_prompts(tok), max_new_tokens=n, stop_ids=[-1],
                              temperature=1.0)
    assert all(len(r["tokens"]) == n and not r["finished"] for r in results)


def nan_logits_from_call(model, call: int, rows=None):
    """Make the head's output NaN from its `call`-th forward on (1 = the prefill, so `call` = generated token
    `call`), in `rows` only when given."""
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) >= call:
            output = output.clone()
            output[rows if rows is not None else slice(None)] = math.nan
            return output

    return models.output_head(model).register_forward_hook(hook)


@pytest.mark.parametrize("bad_token", [1, 5, generation.STOP_CHECK_EVERY + 2])
def test_nonfinite_logits_raise_naming_the_model_and_the_token(kit, bad_token):
    model, tok = models.load_model(str(kit["student"]))
    nan_logits_from_call(model, bad_token)
    with pytest.raises(common.DistillError, match=rf"--teacher's logits are not finite .* at generated token "
                                                  rf"{bad_token}:"):
        generation.generate(model, tok, chat_prompts(tok), max_new_tokens=3 * generation.STOP_CHECK_EVERY,
                        temperature=1.0, top_p=0.9, what="--teacher")


def test_nonfinite_logits_of_a_finished_row_are_not_an_error(kit):
    model, tok = models.load_model(str(kit["student"]))
    prompts = chat_prompts(tok)
    free = greedy_rows(model, tok, prompts, 6)
    stop = free[0][1]
    rows = [i for i, row in enumerate(free) if stop in row[:2]]  # rows finished by their 2nd token
    nan_logits_from_call(model, 4, rows=rows)  # NaN in those rows only, from the 4th token on
    results = generation.generate(model, tok, prompts, max_new_tokens=6, stop_ids=[stop])
    assert all(results[i]["finished"] for i in rows)


def test_never_a_padded_head_row_even_when_it_has_the_highest_logit(kit):
    model, tok = models.load_model(str(kit["student_padded"]))
    head = models.output_head(model)
    assert head.weight.shape[0] > len(tok)

    def boost_padding(module, args, output):
        output = output.clone()
        output[..., len(tok):] += 100.0  # the padded rows would win every argmax and take all the mass
        return output

    head.register_forward_hook(boost_padding)
    prompts = chat_prompts(tok)
    torch.manual_seed(0)
    for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (1.0, 0.5), (20.0, 0.99)):
        results = generation.generate(model, tok, prompts, max_new_tokens=12, temperature=temperature, top_p=top_p,
                                  stop_ids=[-1])
        assert max(t for r in results for t in r["tokens"]) < len(tok)


# -- the sampled distribution ------------------------------------------------------------------------------------


def chi_square_bound(df: int, z: float = 4.75) -> float:
    """The chi-square quantile for a one-sided z-sigma test (z 4.75: p ~ 1e-6), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor, draws: int) -> tuple[float, int]:
    """Pearson's statistic of observed `counts` against `probs` [V] (fp64), the bins expected below 5 draws
    pooled into one; returns (statistic, degrees of freedom)."""
    expected = probs * draws
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return stat, int(keep.sum()) - 1


@pytest.fixture(scope="module")
def peaked(kit):
    """The kit student with a sharpened head (a fixed model whose next-token distribution spans orders of
    magnitude), a prompt, and its next-token logits [V] in fp64 from a plain forward."""
    model, tok = models.load_model(str(kit["student"]))
    with torch.no_grad():
        models.output_head(model).weight.mul_(10.0)
    prompt = tok("Ana has 3 apples", add_special_tokens=False)["input_ids"]  # short: DRAWS prefills of it
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1, :len(tok)].double()
    return model, tok, prompt, logits


DRAWS = 10000


def first_tokens(model, tok, prompt, temperature: float, top_p: float) -> torch.Tensor:
    """The first sampled token of DRAWS copies of one prompt, as counts per token id [V]."""
    torch.manual_seed(0)
    results = generation.generate(model, tok, [prompt] * DRAWS, max_new_tokens=1, temperature=temperature,
                              top_p=top_p, stop_ids=[-1])
    ids = torch.tensor([r["tokens"][0] for r in results])
    return torch.bincount(ids, minlength=len(tok)).double()


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_sampling_follows_softmax_of_logits_over_temperature(peaked, temperature):
    model, tok, prompt, logits = peaked
    probs = torch.softmax(logits / temperature, -1)
    assert probs.max() > 10 * probs.median() and (probs > 1e-3).sum() > 20  # neither flat nor one token
    counts = first_tokens(model, tok, prompt, temperature, 1.0)
    stat, df = chi_square(counts, probs, DRAWS)
    assert stat < chi_square_bound(df), (stat, df)
    # the test can tell: the same draws against the distribution at another temperature fail it
    wrong, wrong_df = chi_square(counts, torch.softmax(logits / (temperature * 1.3), -1), DRAWS)
    assert wrong > chi_square_bound(wrong_df)


def test_top_p_keeps_exactly_the_nucleus_and_renormalizes_it(peaked):
    model, tok, prompt, logits = peaked
    top_p = 0.6
    probs = torch.softmax(logits, -1)
    sorted_probs, order = probs.sort(descending=True)
    # the smallest set of most likely tokens whose mass reaches top_p
    size = int((sorted_probs.cumsum(0) < top_p).sum()) + 1
    nucleus = torch.zeros_like(probs, dtype=torch.bool)
    nucleus[order[:size]] = True
    assert 10 <= size < (probs > 1e-4).sum() / 4  # the cut removes tokens that plain sampling would draw
    counts = first_tokens(model, tok, prompt, 1.0, top_p)
    assert counts[~nucleus].sum() == 0
    assert (counts[nucleus] > 0).all()  # and every token inside is drawn
    kept = torch.where(nucleus, probs, 0.0)
    stat, df = chi_square(counts, kept / kept.sum(), DRAWS)
    assert stat < chi_square_bound(df), (stat, df)
