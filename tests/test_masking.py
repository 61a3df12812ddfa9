"""The assistant mask on three chat-template styles: ChatML (Qwen), Llama-3 headers with a BOS, and a
Mistral-style template with a BOS and no system role. The mask must hold exactly the completion's tokens and the
end-of-turn token that closes the turn, located by character offsets."""

from __future__ import annotations

import pytest
import torch

import common
import models

MESSAGES = [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q?"}]
TRICKY = " Café 🙂 costs 12.5 dollars.\n#### 12.5\n"

# Written out by hand from the tokenizers' segmentations: the exact masked tokens, in order.
EXPECTED = {
    ("student", "#### 5"): ["####", "Ġ", "5", "<|im_end|>"],
    ("student_llama3", "#### 5"): ["####", "Ġ", "5", "<|eot_id|>"],
    ("student_nosys", "#### 5"): ["####", "▁5", "</s>"],
    ("student", TRICKY): ["Ġ", "C", "a", "f", "Ã©", "Ġ", "ð", "Ł", "Ļ", "Ĥ", "Ġco", "s", "ts", "Ġ", "1", "2", ".", "5",
                          "Ġdollars", ".Ċ", "####", "Ġ", "1", "2", ".", "5", "Ċ", "<|im_end|>"],
    # Llama-3's template trims the content, so the leading space and trailing newline are not in the text at all.
    ("student_llama3", TRICKY): ["C", "a", "f", "Ã©", "Ġ", "ð", "Ł", "Ļ", "Ĥ", "Ġco", "s", "ts", "Ġ", "12", ".", "5",
                                 "Ġdollars", ".Ċ", "####", "Ġ", "12", ".", "5", "<|eot_id|>"],
    ("student_nosys", TRICKY): ["▁", "C", "a", "f", "é", "▁", "🙂", "▁co", "s", "t", "s", "▁12", ".", "5",
                                "▁dollars.\n####", "▁12", ".", "5", "\n", "</s>"],
}
STYLES = ["student", "student_llama3", "student_nosys"]


@pytest.fixture(scope="module")
def tokenizers(kit):
    return {name: models.load_tokenizer(str(kit[name])) for name in STYLES}


@pytest.mark.parametrize("name,completion", list(EXPECTED))
def test_mask_is_exactly_completion_plus_end_of_turn(tokenizers, name, completion):
    tok = tokenizers[name]
    enc = common.encode_chat(tok, MESSAGES, completion)
    ids, mask = enc["input_ids"], enc["loss_mask"]
    masked = [i for i, m in zip(ids, mask) if m]
    assert tok.convert_ids_to_tokens(masked) == EXPECTED[name, completion]
    # Contiguous, and the last masked token is the turn's end: nothing after it (e.g. ChatML's "\n") is trained.
    first, last = mask.index(1), len(mask) - 1 - mask[::-1].index(1)
    assert all(mask[first:last + 1])
    assert ids[last] == common.end_of_turn_ids(tok)[0]
    # Independent check by ids: the masked tokens are what the full conversation adds after the generation prompt.
    prompt = common.render_chat(tok, MESSAGES, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if ids[:len(prompt_ids)] == prompt_ids:
        assert masked == ids[len(prompt_ids):last + 1]


def test_templates_render_their_style(tokenizers):
    chatml = common.render_chat(tokenizers["student"], MESSAGES, add_generation_prompt=True)
    assert chatml == "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    llama = common.render_chat(tokenizers["student_llama3"], MESSAGES, add_generation_prompt=True)
    assert llama.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    # No system role: the system prompt is folded into the user turn instead of failing or being dropped.
    nosys = common.render_chat(tokenizers["student_nosys"], MESSAGES, add_generation_prompt=True)
    assert nosys.startswith("<s>") and "Sys\n\nQ?" in nosys and "system" not in nosys


def test_completion_text_repeated_in_prompt_is_masked_only_in_the_answer(tokenizers):
    tok = tokenizers["student"]
    messages = [{"role": "user", "content": "Say #### 5 please"}]
    enc = common.encode_chat(tok, messages, "#### 5")
    masked = [i for i, m in zip(enc["input_ids"], enc["loss_mask"]) if m]
    assert tok.convert_ids_to_tokens(masked) == ["####", "Ġ", "5", "<|im_end|>"]


def test_pad_equal_to_eos_still_trains_the_real_eos(tokenizers):
    """Llama-3 has no pad token: pad falls back to EOS (<|eot_id|>). Padding is masked by position, so the real
    end-of-turn keeps mask 1 while the pads that share its id get 0 (the pad == eos bug)."""
    tok = tokenizers["student_llama3"]
    assert tok.pad_token_id == tok.eos_token_id
    short = common.encode_chat(tok, MESSAGES, "#### 5")
    long = common.encode_chat(tok, MESSAGES, "2 + 3 = 5\n#### 5")
    batch = common.pad_batch([short, long], tok.pad_token_id)
    row = batch["input_ids"][0]
    eot = tok.eos_token_id
    eot_positions = (row == eot).nonzero().flatten().tolist()
    real_eot = len(short["input_ids"]) - 1
    assert real_eot in eot_positions and len(eot_positions) > 1  # the real one and the pads
    assert batch["loss_mask"][0, real_eot] == 1
    assert batch["loss_mask"][0, real_eot + 1:].sum() == 0 and batch["attention_mask"][0, real_eot + 1:].sum() == 0
    assert batch["loss_mask"][0].sum() == sum(short["loss_mask"])
    left = common.pad_batch([short, long], tok.pad_token_id, side="left")
    assert left["attention_mask"][0, :len(long["input_ids"]) - len(short["input_ids"])].sum() == 0
    assert torch.equal(left["input_ids"][1], torch.tensor(long["input_ids"]))


def test_shift_pairs_hidden_states_with_next_tokens(tokenizers):
    tok = tokenizers["student"]
    enc = common.encode_chat(tok, MESSAGES, "#### 5")
    batch = common.pad_batch([enc], tok.pad_token_id)
    hidden = torch.arange(len(enc["input_ids"]), dtype=torch.float32)[None, :, None]
    positions, targets = common.shift_for_next_token(hidden, batch)
    first = enc["loss_mask"].index(1)
    # The first completion token is predicted from the last prompt position.
    assert positions[0, 0].item() == first - 1
    assert targets.tolist() == [i for i, m in zip(enc["input_ids"], enc["loss_mask"]) if m]


def test_max_length_returns_none(tokenizers):
    tok = tokenizers["student"]
    assert common.encode_chat(tok, MESSAGES, "#### 5", max_length=5) is None


def test_no_chat_template_is_a_clear_error(tokenizers):
    tok = tokenizers["student"]
    saved, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(common.DistillError, match="has no chat template"):
            common.encode_chat(tok, MESSAGES, "x")
    finally:
        tok.chat_template = saved
