"""Every numeric flag is checked when the command line is parsed: a value outside its range stops the script with
one line naming the flag, before anything is loaded (no value can silently mean something else)."""

from __future__ import annotations

import pytest

import cache_teacher
import cross_tokenizer
import doctor
import eval as evaluate
import generate_data
import on_policy
import sequence_level
import token_level
import training

TRAIN = ["--data", "d.jsonl", "--output-dir", "out"]
SCRIPTS = {
    "sequence_level": (sequence_level, TRAIN),
    "token_level": (token_level, TRAIN),
    "on_policy": (on_policy, TRAIN),
    "cross_tokenizer": (cross_tokenizer, TRAIN),
    "generate_data": (generate_data, ["--output", "o.jsonl"]),
    "eval": (evaluate, ["--model", "m"]),
    "cache_teacher": (cache_teacher, ["--data", "d.jsonl", "--output", "c"]),
    "doctor": (doctor, ["--data", "d.jsonl"]),
}
TRAINING = ("sequence_level", "token_level", "on_policy", "cross_tokenizer")

# (flag, a value outside its range): every training script shares these through common.add_train_args.
SHARED_TRAIN = [
    ("--batch-size", "0"), ("--grad-accum", "0"), ("--chunk-size", "-1"), ("--lr", "-0.5"), ("--lr", "nan"),
    ("--lr", "inf"), ("--max-steps", "0"), ("--max-steps", "-3"), ("--epochs", "0"), ("--epochs", "-1"),
    ("--max-grad-norm", "-1"), ("--warmup-ratio", "1.5"), ("--warmup-ratio", "-0.1"), ("--weight-decay", "-0.1"),
    ("--lora-r", "0"), ("--lora-alpha", "0"), ("--lora-dropout", "1"), ("--max-length", "1"),
    ("--save-every", "-1"), ("--log-every", "0"), ("--eval-every", "-1"), ("--eval-max-new-tokens", "0"),
    ("--eval-batch-size", "0"), ("--seed", "-1"), ("--max-steps", "2.5"), ("--save-total-limit", "-1"),
]
OWN = [
    ("token_level", "--temperature", "0"), ("token_level", "--alpha", "1.5"), ("token_level", "--beta", "-0.5"),
    ("on_policy", "--lmbda", "2"), ("on_policy", "--beta", "nan"), ("on_policy", "--temperature", "0"),
    ("on_policy", "--gen-temperature", "-1"), ("on_policy", "--top-p", "0"), ("on_policy", "--top-p", "1.5"),
    ("on_policy", "--max-new-tokens", "0"), ("on_policy", "--vllm-gpu-memory", "0"),
    ("cross_tokenizer", "--top-k", "0"), ("cross_tokenizer", "--temperature", "-2"),
    ("cross_tokenizer", "--alpha", "-1"), ("cross_tokenizer", "--min-exact-alignment", "1.5"),
    ("cross_tokenizer", "--beta", "1.5"),
    ("generate_data", "--max-new-tokens", "0"), ("generate_data", "--temperature", "-0.7"),
    ("generate_data", "--top-p", "0"), ("generate_data", "--top-p", "1.01"), ("generate_data", "--batch-size", "0"),
    ("generate_data", "--num-examples", "0"), ("generate_data", "--vllm-gpu-memory", "1.5"),
    ("generate_data", "--seed", "-2"),
    ("eval", "--max-new-tokens", "0"), ("eval", "--batch-size", "0"), ("eval", "--num-examples", "-5"),
    ("cache_teacher", "--top-k", "0"), ("cache_teacher", "--batch-size", "0"), ("cache_teacher", "--shard-rows", "0"),
    ("cache_teacher", "--max-length", "1"), ("cache_teacher", "--chunk-size", "-1"),
    ("cache_teacher", "--samples", "0"), ("cache_teacher", "--samples", "40000"),
    ("cache_teacher", "--temperatures", "0"),
    ("doctor", "--rows", "0"), ("doctor", "--batch-size", "0"), ("doctor", "--max-length", "1"),
    ("doctor", "--temperature", "0"), ("doctor", "--alpha", "1.5"), ("doctor", "--chunk-size", "-1"),
]
CASES = [(script, flag, value) for script in TRAINING for flag, value in SHARED_TRAIN] + OWN


@pytest.mark.parametrize("script,flag,value", CASES)
def test_out_of_range_flag_is_one_line_naming_it(capsys, script, flag, value):
    module, required = SCRIPTS[script]
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args([*required, flag, value])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: argument {flag}: must be " in last, last
    assert value in last  # the offending value is quoted back


@pytest.mark.parametrize("script,flags", [
    # The documented edge values stay accepted: 0 = automatic / off / greedy, 1 = the whole range.
    ("sequence_level", ["--chunk-size", "0", "--max-grad-norm", "0", "--lr", "0", "--warmup-ratio", "1",
                        "--save-every", "0", "--epochs", "0.5", "--weight-decay", "0", "--max-length", "2",
                        "--lora-dropout", "0", "--seed", "0"]),
    ("token_level", ["--alpha", "0", "--beta", "1", "--temperature", "0.5"]),
    ("on_policy", ["--lmbda", "1", "--gen-temperature", "0", "--top-p", "1", "--vllm-gpu-memory", "1"]),
    ("generate_data", ["--temperature", "0", "--top-p", "1", "--max-new-tokens", "1", "--num-examples", "1"]),
    ("cross_tokenizer", ["--min-exact-alignment", "0", "--top-k", "1"]),
    ("cache_teacher", ["--chunk-size", "0", "--top-k", "1"]),
])
def test_edge_values_are_accepted(script, flags):
    module, required = SCRIPTS[script]
    module.parse_args([*required, *flags])


@pytest.mark.parametrize("rows,flags,processes,want", [
    (16, ["--batch-size", "4"], 1, (4, 4)),                       # 4 micro-batches of 4
    (17, ["--batch-size", "4"], 1, (5, 5)),                       # the 17th row: a short 5th micro-batch
    (16, ["--batch-size", "4", "--grad-accum", "3"], 1, (2, 2)),  # 4 micro-batches -> steps of 3 and 1
    (16, ["--batch-size", "2"], 2, (4, 4)),                       # 2 processes x 2 rows
    (16, ["--batch-size", "4", "--epochs", "2.5"], 1, (4, 10)),
    (16, ["--batch-size", "4", "--epochs", "0.1"], 1, (4, 1)),    # a fraction of a step is one step
    (16, ["--batch-size", "4", "--epochs", "3", "--max-steps", "7"], 1, (4, 7)),  # --max-steps wins
])
def test_epochs_become_optimizer_steps(rows, flags, processes, want):
    args = sequence_level.parse_args([*TRAIN, *flags])
    assert training.count_steps(rows, args, processes) == want


def test_a_run_takes_the_steps_counted(kit, tmp_path):
    from conftest import read_metrics, write_rows

    data = write_rows(tmp_path / "d.jsonl", 10)
    out = tmp_path / "run"
    sequence_level.main(["--student", str(kit["student"]), "--data", str(data), "--output-dir", str(out),
                         "--batch-size", "3", "--grad-accum", "2", "--epochs", "1.5", "--lr", "0"])
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3]  # 4 micro-batches, 2 steps an epoch, x 1.5
