"""Teacher answers cut at --max-new-tokens (finish_reason "length") never teach the student to stop mid-sentence:
they train without the end-of-turn token (--truncated no-eos, the default) or not at all (--truncated skip), are
counted in the end-of-run report, and generate_data.py never keeps an empty completion as a finished row."""

from __future__ import annotations

import json

import pytest

import cache_teacher
import common
import cross_tokenizer
import generate_data
import generation
import models
import sequence_level
import token_level
from conftest import write_rows


def with_cut_rows(path, n: int, cut: tuple[int, ...]):
    """write_rows, with generate_data's finish_reason: the rows in `cut` hit --max-new-tokens."""
    rows = [json.loads(line) for line in write_rows(path, n).read_text().splitlines()]
    for i, row in enumerate(rows):
        row["finish_reason"] = "length" if i in cut else "stop"
        if i in cut:  # a cut answer stops mid-way
            row["completion"] = row["completion"].split("\n")[0]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def masked_tokens(tokenizer, example) -> list[str]:
    return tokenizer.convert_ids_to_tokens([i for i, m in zip(example["input_ids"], example["loss_mask"]) if m])


@pytest.fixture(scope="module")
def tokenizer(kit):
    return models.load_tokenizer(str(kit["student"]))


def test_a_cut_row_trains_without_the_end_of_turn_token(tokenizer, tmp_path):
    rows = common.load_distill_rows(with_cut_rows(tmp_path / "d.jsonl", 2, cut=(1,)))
    (done, cut), skipped = common.encode_rows(rows, tokenizer, 1024)
    assert skipped == 0
    assert masked_tokens(tokenizer, done)[-1] == "<|im_end|>"
    # The cut row still trains on every token of its text, but not on the end-of-turn token the template adds.
    assert masked_tokens(tokenizer, cut)[-1] != "<|im_end|>"
    assert "<|im_end|>" in tokenizer.convert_ids_to_tokens(cut["input_ids"][-2:])
    text = rows[1]["completion"]
    assert tokenizer.convert_tokens_to_string(masked_tokens(tokenizer, cut)) == text
    assert cut["completion_offsets"][-1][1] == len(text)  # no virtual end-of-turn span either
    kept, skipped = common.encode_rows(rows, tokenizer, 1024, truncated="skip")
    assert [ex["id"] for ex in kept] == ["train-0"] and skipped == 0


@pytest.mark.parametrize("mode,line", [
    ("no-eos", "2 of 8 rows were cut at --max-new-tokens by generate_data.py (finish_reason 'length'): trained "
               "without their end-of-turn token (--truncated no-eos)"),
    ("skip", "skipped 2 of 8 rows cut at --max-new-tokens by generate_data.py (finish_reason 'length'; "
             "--truncated skip)"),
])
def test_the_end_of_run_report_counts_cut_rows(kit, tmp_path, capsys, mode, line):
    data = with_cut_rows(tmp_path / "d.jsonl", 8, cut=(2, 5))
    sequence_level.main(["--student", str(kit["student"]), "--data", str(data), "--output-dir",
                         str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "4", "--truncated", mode])
    assert line in capsys.readouterr().out


def test_every_row_cut_and_skipped_is_a_clear_error(tokenizer, tmp_path):
    rows = common.load_distill_rows(with_cut_rows(tmp_path / "d.jsonl", 2, cut=(0, 1)))
    with pytest.raises(common.DistillError, match=r"no row left to train on: 2 cut at --max-new-tokens"):
        common.encode_rows(rows, tokenizer, 1024, truncated="skip")


def test_cross_tokenizer_pairs_no_end_of_turn_for_a_cut_row(kit, tokenizer, tmp_path):
    rows = common.load_distill_rows(with_cut_rows(tmp_path / "d.jsonl", 2, cut=(1,)))
    teacher_tok = models.load_tokenizer(str(kit["student_llama3"]))
    (done, cut), skipped, _ = cross_tokenizer.encode_pairs(rows, tokenizer, teacher_tok, 1024)
    eot = teacher_tok.convert_tokens_to_ids("<|eot_id|>")
    assert done["teacher_ids"][done["teacher_targets"][-1]] == eot
    assert all(cut["teacher_ids"][j] != eot for j in cut["teacher_targets"])
    assert masked_tokens(tokenizer, cut)[-1] != "<|im_end|>"
    (kept,), _, _ = cross_tokenizer.encode_pairs(rows, tokenizer, teacher_tok, 1024, truncated="skip")
    assert kept["input_ids"] == done["input_ids"]


def test_the_teacher_cache_holds_cut_rows_as_token_level_trains_them(kit, tmp_path):
    data = with_cut_rows(tmp_path / "d.jsonl", 4, cut=(1, 2))
    cache_teacher.main(["--teacher", str(kit["teacher"]), "--data", str(data), "--output", str(tmp_path / "c"),
                        "--top-k", "4"])
    student, tok = models.load_model(str(kit["student"]))
    examples, _ = common.encode_rows(common.load_distill_rows(data), tok, 1024)
    kept, _, _ = token_level.attach_cache(tmp_path / "c", tok, examples, student)
    assert len(kept) == 4  # no row "differs" from the cache: both left the cut rows' end-of-turn out


# ---- generate_data.py: an empty completion is never a finished row ---------------------------------------------


def write_prompts(path, n: int):
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(n)))
    return path


def gen_args(kit, prompts, output):
    return ["--teacher", str(kit["teacher"]), "--dataset", str(prompts), "--output", str(output),
            "--max-new-tokens", "4", "--temperature", "0", "--batch-size", "4"]


def fake_generate(empty: set[int]):
    """generation.generate that answers '#### 7' to every prompt but those at the positions in `empty`, which it
    ends at once (an empty completion)."""
    def generate(model, tokenizer, prompts, *, stop_ids, **_):
        answer = tokenizer("#### 7", add_special_tokens=False)["input_ids"]
        return [{"tokens": ([] if i in empty else answer) + [stop_ids[0]], "finished": True}
                for i in range(len(prompts))]
    return generate


def test_empty_completions_are_not_written(kit, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generation, "generate", fake_generate(empty={1, 2}))
    out = tmp_path / "o.jsonl"
    generate_data.main(gen_args(kit, write_prompts(tmp_path / "p.jsonl", 4), out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["train-0", "train-3"] and all(r["completion"] == "#### 7" for r in rows)
    assert "2 prompts got an empty completion" in capsys.readouterr().out


def test_an_empty_completion_left_in_the_output_is_generated_again(kit, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generation, "generate", fake_generate(empty=set()))
    prompts, out = write_prompts(tmp_path / "p.jsonl", 3), tmp_path / "o.jsonl"
    generate_data.main(gen_args(kit, prompts, out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rows[1]["completion"] = ""  # what a broken run (or an older version) left behind
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    generate_data.main(gen_args(kit, prompts, out))
    assert "1 row with an empty completion" in capsys.readouterr().out
    # The empty row is dropped (the file replaced at once, never rewritten in place) and its id generated again:
    # the file never holds one id twice.
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in again] == ["train-0", "train-2", "train-1"]
    assert again[-1]["completion"] == "#### 7"
    assert not list(tmp_path.glob(".o.jsonl*")), "no temporary file left behind"
    assert generate_data.load_done(out)["train-1"]["completion"] == "#### 7"
    rows = common.load_distill_rows(out)
    assert sorted(r["id"] for r in rows) == ["train-0", "train-1", "train-2"]
    generate_data.main(gen_args(kit, prompts, out))  # a third run has nothing left to do
    assert "0 to generate" in capsys.readouterr().out


def test_every_completion_empty_is_an_error(kit, tmp_path, monkeypatch):
    monkeypatch.setattr(generation, "generate", fake_generate(empty={0, 1}))
    with pytest.raises(common.DistillError, match="--teacher returned an empty completion for every prompt"):
        generate_data.main(gen_args(kit, write_prompts(tmp_path / "p.jsonl", 2), tmp_path / "o.jsonl"))
