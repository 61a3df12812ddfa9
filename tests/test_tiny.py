"""Tests for tiny.py, the offline model kit the other tests and the demo are built on."""

import json
import os
import re
import sys
import time
from pathlib import Path

import jinja2
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Lets a bare `pytest` (not only `python -m pytest` from the repo root) import the scripts.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config  # noqa: E402

import common  # noqa: E402
import generation  # noqa: E402
import tiny  # noqa: E402

CHATML_FOLDERS = ["teacher", "teacher_llama", "student", "student_padded"]
STYLE_FOLDER = {"chatml": "student", "llama3": "student_llama3", "nosys": "student_nosys"}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "nosys": "</s>"}

# Strings where tokenizer pipelines tend to disagree: digit grouping, runs of spaces, newlines, special tokens in
# plain text, NFC vs decomposed accents, emoji (multi-byte), CJK, punctuation.
TRICKY = [
    "12345 + 678 = 13023",
    "Ana has 7 apples. 3 + 4 = 7\n#### 7",
    "  leading and   inner  spaces, trailing  ",
    "line\n\n\nbreaks\r\nand\ttabs",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "café, Zoë, Jürgen, naïve",
    "e\u0301 (decomposed é) vs \u00e9",
    "emoji 🙂🥧 ✅ and CJK 你好，世界 数学",
    "don't you'LL SEE it's 3.14? $4.50 €3",
    "",
]


@pytest.fixture(scope="session")
def kit(tmp_path_factory):
    return tiny.build_kit(tmp_path_factory.mktemp("tiny_kit"))


def _load(kit, name):
    return AutoTokenizer.from_pretrained(kit[name])


def _render(tok, messages, **kwargs):
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# corpus


def test_corpus_is_deterministic_and_varied():
    corpus = tiny.make_corpus(400, seed=3)
    assert corpus == tiny.make_corpus(400, seed=3)
    assert corpus != tiny.make_corpus(400, seed=4)
    text = "\n".join(corpus)
    for needle in ["é", "ü", "🙂", "你好", "####", "\n", "?", "+", "*"]:
        assert needle in text


def test_problems_are_correct_and_end_with_the_answer():
    import random

    rng = random.Random(0)
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    for _ in range(300):
        question, solution, answer = tiny.make_problem(rng)
        assert question.endswith("?")
        assert solution.endswith(f"\n#### {answer}")
        equations = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", solution)
        assert equations
        for a, op, b, c in equations:
            assert ops[op](int(a), int(b)) == int(c), solution
        assert equations[-1][3] == answer


# ---------------------------------------------------------------------------------------------------------------
# folders and models


@pytest.mark.parametrize("name", list(tiny.KIT))
def test_folder_reloads_and_runs(kit, name):
    arch, style, _ = tiny.KIT[name]
    tok = _load(kit, name)
    model = AutoModelForCausalLM.from_pretrained(kit[name])
    assert type(model).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    assert model.dtype == torch.float32
    rows = model.config.vocab_size
    if name == "student_padded":
        assert rows == tiny.padded_rows(len(tok)) > len(tok)
    else:
        assert rows == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == rows

    assert model.config.bos_token_id == tok.bos_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    end_of_turn = tok.convert_tokens_to_ids(END_OF_TURN[style])
    assert end_of_turn in model.generation_config.eos_token_id

    text = _render(tok, [{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], rows)
    assert torch.isfinite(logits).all()


def test_sizes_and_generation(kit):
    teacher = AutoModelForCausalLM.from_pretrained(kit["teacher"])
    student = AutoModelForCausalLM.from_pretrained(kit["student"])
    assert teacher.num_parameters() > student.num_parameters()
    tok = _load(kit, "teacher")
    # Our decode loop (generation.generate, used by generate_data, eval and on_policy), not transformers': a stop id
    # that never comes means exactly max_new_tokens tokens, unfinished; the real stop ids end a sample early.
    prompts = [tok("Ana has 7 apples.")["input_ids"], tok("Tom")["input_ids"]]
    for result in generation.generate(teacher, tok, prompts, max_new_tokens=4, stop_ids=[10**9]):
        assert len(result["tokens"]) == 4 and not result["finished"]
    for result in generation.generate(teacher, tok, prompts, max_new_tokens=4):
        assert 1 <= len(result["tokens"]) <= 4
        assert result["finished"] == (result["tokens"][-1] in common.end_of_turn_ids(tok))


def test_build_model_rejects_too_few_rows():
    tok = tiny.build_tokenizer("nosys", corpus=tiny.make_corpus(200))
    with pytest.raises(ValueError, match="vocab_rows"):
        tiny.build_model("llama", tok, vocab_rows=len(tok) - 1)


# ---------------------------------------------------------------------------------------------------------------
# tokenizers


def test_styles_differ():
    corpus = tiny.make_corpus()
    toks = {style: tiny.build_tokenizer(style, corpus=corpus) for style in tiny.STYLES}
    assert {style: len(tok) for style, tok in toks.items()} == {"chatml": 512, "llama3": 600, "nosys": 480}
    chatml, llama3, nosys = toks["chatml"], toks["llama3"], toks["nosys"]
    assert (chatml.bos_token, chatml.eos_token, chatml.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    assert (llama3.bos_token, llama3.eos_token, llama3.pad_token) == ("<|begin_of_text|>", "<|eot_id|>", None)
    assert (nosys.bos_token, nosys.eos_token, nosys.pad_token, nosys.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    # Byte-level styles keep their specials at the end of the vocabulary, the SentencePiece-like one at the start.
    assert min(chatml.all_special_ids) >= len(chatml) - 3
    assert max(nosys.all_special_ids) < 6
    # Qwen2 splits every digit, Llama 3 groups up to three, Metaspace leaves it to the merges.
    assert chatml.tokenize("12345") == ["1", "2", "3", "4", "5"]
    assert all(len(t) <= 3 for t in llama3.tokenize("1234567"))
    assert nosys.tokenize("hi there")[0].startswith("▁")
    # Deterministic training, so an in-memory tokenizer equals the one saved in the kit.
    assert tiny.build_tokenizer("chatml", corpus=corpus).get_vocab() == chatml.get_vocab()


def _fingerprint(tok):
    """Everything about a tokenizer that the distill scripts can observe."""
    backend = json.loads(tok.backend_tokenizer.to_str())
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? 🙂"},
            {"role": "assistant", "content": "4\n#### 4"}]
    return {
        "len": len(tok),
        "vocab": tok.get_vocab(),
        "special": {k: (getattr(tok, k), getattr(tok, k + "_id"))
                    for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "all_special_ids": sorted(tok.all_special_ids),
        "pipeline": {k: backend[k] for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")},
        "encodings": [tok(t, return_offsets_mapping=True).data for t in TRICKY],
        "plain": [tok(t, add_special_tokens=False)["input_ids"] for t in TRICKY],
        "decoded": [tok.decode(tok(t)["input_ids"]) for t in TRICKY],
        "templates": [_render(tok, msgs), _render(tok, msgs[1:]),
                      _render(tok, msgs[:-1], add_generation_prompt=True)] if tok.chat_template else None,
    }


def test_shared_chatml_tokenizer_is_identical_everywhere(kit):
    """The Qwen2Tokenizer pitfall: qwen2-arch folders are loaded by another class than llama-arch ones."""
    files = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    for name in CHATML_FOLDERS[1:]:
        for f in files:
            assert (kit[name] / f).read_bytes() == (kit["teacher"] / f).read_bytes(), (name, f)

    reference = _fingerprint(tiny.build_tokenizer("chatml"))
    for name in CHATML_FOLDERS:
        assert _fingerprint(_load(kit, name)) == reference, name
    # Decoding round-trips, NFC aside (Qwen2 normalizes, so decomposed accents come back composed).
    tok = _load(kit, "teacher")
    for text in TRICKY:
        assert tok.decode(tok(text)["input_ids"]) == tok.backend_tokenizer.normalizer.normalize_str(text)


def test_the_pitfall_is_real(tmp_path):
    """Why the chatml tokenizer copies Qwen2Tokenizer's pipeline: a plain GPT-2-style byte-level tokenizer saved in
    a qwen2-arch folder comes back re-split, NFC-normalized and with an extra <|endoftext|>."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(tiny.make_corpus(500), BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    raw.add_special_tokens([AddedToken(t, special=True) for t in ["<|im_start|>", "<|im_end|>"]])
    naive = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>")
    loaded = {}
    for arch, config in [("qwen2", Qwen2Config()), ("llama", LlamaConfig())]:
        naive.save_pretrained(tmp_path / arch)
        config.save_pretrained(tmp_path / arch)
        loaded[arch] = AutoTokenizer.from_pretrained(tmp_path / arch)
    if type(loaded["qwen2"]).__name__ != "Qwen2Tokenizer":
        pytest.skip("this transformers no longer forces Qwen2Tokenizer on qwen2 folders")
    assert _fingerprint(loaded["llama"])["plain"] == _fingerprint(naive)["plain"]
    assert _fingerprint(loaded["qwen2"])["plain"] != _fingerprint(naive)["plain"]
    assert "<|endoftext|>" in loaded["qwen2"].get_vocab() and "<|endoftext|>" not in naive.get_vocab()


def _offset_check(tok, rendered, completion, style):
    enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert len(offsets) == len(ids)
    assert all(s <= e for s, e in offsets)
    assert [s for s, _ in offsets] == sorted(s for s, _ in offsets)
    for i, (s, e) in zip(ids, offsets):
        if i in tok.all_special_ids:
            assert rendered[s:e] == tok.convert_ids_to_tokens(i)
    start = rendered.index(completion)
    end = start + len(completion)
    inside = [k for k, (s, e) in enumerate(offsets) if s < end and e > start]
    assert tok.decode(ids[inside[0]:inside[-1] + 1]) == completion
    after = next(k for k, (s, e) in enumerate(offsets) if s >= end and e > s)
    assert tok.convert_ids_to_tokens(ids[after]) == END_OF_TURN[style]


COMPLETION = "3 + 4 = 7 🙂 café\n#### 7"
USER = "Ana has 3 apples and buys 4. How many?"


def test_chatml_template(kit):
    tok = _load(kit, "student")
    msgs = [{"role": "user", "content": USER}, {"role": "assistant", "content": COMPLETION}]
    assert _render(tok, msgs) == (f"<|im_start|>user\n{USER}<|im_end|>\n"
                                  f"<|im_start|>assistant\n{COMPLETION}<|im_end|>\n")
    assert _render(tok, msgs[:1], add_generation_prompt=True) == (
        f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n")
    system = [{"role": "system", "content": "Be brief."}, *msgs]
    assert _render(tok, system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    _offset_check(tok, _render(tok, msgs), COMPLETION, "chatml")


def test_llama3_template(kit):
    tok = _load(kit, "student_llama3")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": USER},
            {"role": "assistant", "content": f"  {COMPLETION}\n"}]
    head = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert _render(tok, msgs) == (
        "<|begin_of_text|>" + head.format("system") + "Be brief.<|eot_id|>" + head.format("user") + USER
        + "<|eot_id|>" + head.format("assistant") + COMPLETION + "<|eot_id|>")
    assert _render(tok, msgs[:2], add_generation_prompt=True).endswith(
        "<|eot_id|>" + head.format("assistant"))
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # Like Llama 3, plain encoding adds the BOS too (so chat text must be encoded with add_special_tokens=False).
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    _offset_check(tok, _render(tok, msgs), COMPLETION, "llama3")


def test_nosys_template(kit):
    tok = _load(kit, "student_nosys")
    msgs = [{"role": "user", "content": USER}, {"role": "assistant", "content": COMPLETION}]
    assert _render(tok, msgs) == f"<s>[INST] {USER}[/INST]{COMPLETION}</s>"
    # No generation header: the assistant's text follows [/INST] directly.
    assert _render(tok, msgs[:1], add_generation_prompt=True) == f"<s>[INST] {USER}[/INST]"
    with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):
        _render(tok, [{"role": "system", "content": "Be brief."}, *msgs])
    _offset_check(tok, _render(tok, msgs), COMPLETION, "nosys")
    assert tok.convert_tokens_to_ids("<unk>") == tok.unk_token_id is not None


@pytest.mark.parametrize("style", list(tiny.STYLES))
def test_offsets_on_tricky_text(kit, style):
    tok = _load(kit, STYLE_FOLDER[style])
    for text in TRICKY:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert len(enc["offset_mapping"]) == len(enc["input_ids"])
        assert all(0 <= s <= e <= len(text) for s, e in enc["offset_mapping"])


# ---------------------------------------------------------------------------------------------------------------
# building


def test_build_twice_reuses(kit):
    root = kit["teacher"].parent
    stamp = (kit["teacher"] / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = tiny.build_kit(root)
    assert time.perf_counter() - start < 1.0
    assert again == kit
    assert (kit["teacher"] / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in root.parent.iterdir() if p.name.startswith(f".{root.name}-")]


def test_stale_kit_is_rebuilt_and_foreign_folder_refused(tmp_path):
    root = tmp_path / "kit"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        tiny.build_kit(root)
    assert (root / "notes.txt").read_text() == "mine"

    stale = tmp_path / "stale"
    (stale / "teacher").mkdir(parents=True)
    (stale / tiny.MARKER).write_text('{"kit_version": "0"}\n')
    paths = tiny.build_kit(stale)
    assert (stale / tiny.MARKER).read_text() == tiny._marker_text()
    assert all((p / "config.json").is_file() for p in paths.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kit", "stale"]
