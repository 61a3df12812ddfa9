"""Real chat templates that put whitespace around the assistant text: Llama-2-chat renders
`' ' + content.strip() + ' ' + eos_token`, so a whitespace-only token sits between the answer and `</s>` (and,
with a vocabulary lacking the merge, between `[/INST]` and the answer). The student must write those tokens
itself, so they are in the mask; cross-tokenizer alignment still pairs end-of-turn with end-of-turn."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

import common
import cross_tokenizer
import models
import on_policy
from conftest import write_rows


def llama2_template(bos: bool = True) -> str:
    """Llama-2-chat's template (system prompt inside the first [INST] block), optionally without the BOS."""
    return (
        "{%- if messages[0]['role'] == 'system' %}{%- set loop_messages = messages[1:] %}"
        "{%- set system_message = messages[0]['content'] %}"
        "{%- else %}{%- set loop_messages = messages %}{%- set system_message = false %}{%- endif %}"
        "{%- for message in loop_messages %}"
        "{%- if loop.index0 == 0 and system_message != false %}"
        "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{%- else %}{%- set content = message['content'] %}{%- endif %}"
        "{%- if message['role'] == 'user' %}{{ " + ("bos_token + " if bos else "")
        + "'[INST] ' + content.strip() + ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{%- endif %}"
        "{%- endfor %}"
    )


MESSAGES = [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q?"}]
# The kit's SentencePiece (Metaspace) vocabulary and its byte-level BPE one, each with the Llama-2 shape.
EXPECTED = {
    "student_nosys": ["▁", "####", "▁5", "▁", "</s>"],
    "student": ["Ġ", "####", "Ġ", "5", "Ġ", "<|im_end|>"],
}


@pytest.fixture(scope="module")
def llama2_tokenizers(kit):
    tokenizers = {}
    for name in EXPECTED:
        tok = models.load_tokenizer(str(kit[name]))
        tok.chat_template = llama2_template(bos=tok.bos_token is not None)
        tokenizers[name] = tok
    return tokenizers


def masked(tok, enc) -> list[str]:
    return tok.convert_ids_to_tokens([i for i, m in zip(enc["input_ids"], enc["loss_mask"]) if m])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_whitespace_around_the_answer_is_trained(llama2_tokenizers, name):
    tok = llama2_tokenizers[name]
    enc = common.encode_chat(tok, MESSAGES, "#### 5")
    assert masked(tok, enc) == EXPECTED[name]
    # The prompt the model is asked with (on-policy sampling) ends at [/INST]: everything after it, up to </s>, is
    # the model's to write.
    args = SimpleNamespace(max_length=None, truncated="no-eos")
    [example], _ = on_policy.encode_with_prompts([{"messages": MESSAGES, "completion": "#### 5"}], tok, args)
    assert example["input_ids"] == enc["input_ids"]
    prompt = example["prompt_ids"]
    assert enc["input_ids"][:len(prompt)] == prompt
    assert [i for i, m in zip(enc["input_ids"], enc["loss_mask"]) if m] == enc["input_ids"][len(prompt):]
    assert common.end_of_turn_ids(tok)[0] == tok.eos_token_id
    spans = enc["completion_offsets"]
    assert len(spans) == len(EXPECTED[name]) and spans[-1] == (6, 7)
    assert [e for _, e in spans] == sorted(e for _, e in spans)


def test_a_cut_answer_leaves_the_closing_whitespace_out_too(llama2_tokenizers):
    tok = llama2_tokenizers["student_nosys"]
    enc = common.encode_chat(tok, MESSAGES, "#### 5", end_of_turn=False)
    assert masked(tok, enc) == ["▁", "####", "▁5"]


def test_text_between_the_answer_and_the_end_of_turn_is_still_refused(llama2_tokenizers):
    tok = llama2_tokenizers["student_nosys"]
    saved, tok.chat_template = tok.chat_template, tok.chat_template.replace("' ' + eos_token", "' END' + eos_token")
    try:
        with pytest.raises(common.DistillError, match="no special end-of-turn token"):
            common.encode_chat(tok, MESSAGES, "#### 5")
    finally:
        tok.chat_template = saved


@pytest.fixture(scope="module")
def llama2_student(kit, tmp_path_factory):
    """The kit's SentencePiece student, saved with the Llama-2-chat template."""
    folder = tmp_path_factory.mktemp("llama2") / "student"
    shutil.copytree(kit["student_nosys"], folder)
    tok = models.load_tokenizer(str(folder))
    tok.chat_template = llama2_template()
    tok.save_pretrained(folder)
    return folder


def test_cross_tokenizer_pairs_end_of_turn_with_end_of_turn(kit, llama2_student, tmp_path):
    """Byte-level BPE teacher (ChatML, no space before <|im_end|>) and a SentencePiece student whose template
    closes with ' </s>': the student's whitespace token pairs with the teacher's last answer token, </s> with
    <|im_end|>."""
    student_tok = models.load_tokenizer(str(llama2_student))
    teacher_tok = models.load_tokenizer(str(kit["teacher"]))
    rows = [{"id": "r", "messages": MESSAGES, "completion": "Ben has 12 apples.\n#### 12"}]
    (ex,), skipped, stats = cross_tokenizer.encode_pairs(rows, student_tok, teacher_tok, 1024)
    teacher_targets = [ex["teacher_ids"][j] for j in ex["teacher_targets"]]
    tokens = masked(student_tok, ex)
    assert tokens[-2:] == ["▁", "</s>"]
    assert teacher_tok.convert_ids_to_tokens(teacher_targets[-2:]) == ["2", "<|im_end|>"]
    assert stats["exact_end_fraction"] > 0.5


def test_cross_tokenizer_trains_a_llama2_template_student(kit, llama2_student, tmp_path):
    out = tmp_path / "run"
    cross_tokenizer.main(["--teacher", str(kit["teacher"]), "--student", str(llama2_student), "--data",
                          str(write_rows(tmp_path / "d.jsonl", 4)), "--output-dir", str(out), "--max-steps", "2",
                          "--batch-size", "2", "--top-k", "4"])
    assert (out / "model.safetensors").exists()
