"""The blog's commands run as written: defaults that chain (generate_data.py, then a bare training script, then a
bare eval.py), one recipe for the blog's whole table (reproduce_blog.py, here on the tiny offline kit), and --help
texts that print each script's example commands exactly as the file writes them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import cache_teacher
import common
import cross_tokenizer
import demo
import doctor
import eval as evaluate
import explain
import generate_data
import models
import on_policy
import plot_metrics
import reproduce_blog
import sequence_level
import token_level
import training
from conftest import ROOT, write_rows

TRAINING = {"sequence_level": sequence_level, "token_level": token_level, "on_policy": on_policy,
            "cross_tokenizer": cross_tokenizer}
SMOL_DATA = "data/teacher_smollm2-1.7b-instruct.jsonl"


# -- --help ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", [generate_data, sequence_level, token_level, on_policy, cross_tokenizer,
                                    cache_teacher, evaluate, plot_metrics, reproduce_blog, demo, doctor,
                                    explain],
                         ids=lambda m: m.__name__)
def test_help_prints_the_docstring_as_the_file_writes_it(module, capsys):
    # A backslash-newline in a non-raw docstring is swallowed by Python: the printed command would be one joined
    # line, not the one in the file. Compare the help with the file's text itself, not with __doc__.
    source = Path(module.__file__).read_text(encoding="utf-8")
    written = re.search(r'^r?"""(.*?)"""', source, re.S).group(1).strip()
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert written in capsys.readouterr().out


def test_help_keeps_a_continued_command_on_two_lines(capsys):
    with pytest.raises(SystemExit):
        token_level.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--eval-problems data/gsm8k_test200.jsonl \\\n        --eval-every 50" in out


# -- defaults --------------------------------------------------------------------------------------------------

def test_default_data_path_is_one_file_per_teacher():
    assert common.default_data_path(None) == common.default_data_path(common.BLOG_TEACHER) == "data/teacher.jsonl"
    assert common.default_data_path(common.ULD_TEACHER) == SMOL_DATA
    assert common.default_data_path("./ckpt/My Teacher/") == "data/teacher_my-teacher.jsonl"
    assert common.generate_command(common.BLOG_TEACHER) == "python generate_data.py"
    assert common.generate_command(common.ULD_TEACHER) == f"python generate_data.py --teacher {common.ULD_TEACHER}"


def test_bare_commands_are_the_blogs_setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for path in ("data/teacher.jsonl", SMOL_DATA):
        write_rows(tmp_path / path, 2)

    gen = generate_data.parse_args([])
    assert (gen.teacher, gen.output, gen.num_examples, gen.temperature) == (
        "Qwen/Qwen2.5-3B-Instruct", "data/teacher.jsonl", 500, 0.0)
    assert (gen.dataset, gen.dataset_config, gen.split) == ("openai/gsm8k", "main", "train")
    assert "#### <number>" in gen.system_prompt
    assert generate_data.parse_args(["--teacher", common.ULD_TEACHER]).output == SMOL_DATA
    assert generate_data.parse_args(["--num-examples", "all"]).num_examples is None

    outputs = {"sequence_level": "runs/sequence_level", "token_level": "runs/token_level-forward",
               "on_policy": "runs/on_policy", "cross_tokenizer": "runs/cross_tokenizer"}
    for name, module in TRAINING.items():
        args = module.parse_args([])
        assert args.student == "Qwen/Qwen2.5-0.5B" and not args.lora
        assert args.output_dir == outputs[name]
        assert args.data == (SMOL_DATA if name == "cross_tokenizer" else "data/teacher.jsonl")
    assert token_level.parse_args(["--kl", "reverse"]).output_dir == "runs/token_level-reverse"
    token = token_level.parse_args([])
    assert (token.teacher, token.kl, token.temperature, token.alpha) == ("Qwen/Qwen2.5-3B-Instruct", "forward", 2, 0.1)
    policy = on_policy.parse_args([])
    assert (policy.teacher, policy.lmbda, policy.kl, policy.temperature) == (
        "Qwen/Qwen2.5-3B-Instruct", 0.5, "reverse", 1)
    assert cross_tokenizer.parse_args([]).teacher == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
    assert sequence_level.parse_args(["--output-dir", "elsewhere"]).output_dir == "elsewhere"

    cache = cache_teacher.parse_args([])
    assert (cache.teacher, cache.data, cache.output) == ("Qwen/Qwen2.5-3B-Instruct", "data/teacher.jsonl",
                                                         "data/teacher.top64")
    bare_eval = evaluate.parse_args([])
    assert (bare_eval.model, bare_eval.student, bare_eval.runs) == (None, "Qwen/Qwen2.5-0.5B", "runs")
    assert (bare_eval.dataset, bare_eval.split, bare_eval.num_examples) == ("openai/gsm8k", "test", 100)


def no_model_loads(*_, **__):
    raise AssertionError("a model was loaded before the data was checked")


@pytest.mark.parametrize("name", list(TRAINING))
def test_missing_default_data_is_one_line_naming_the_command(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "load_model", no_model_loads)
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(lambda: TRAINING[name].main([]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    path, command = ((SMOL_DATA, "python generate_data.py --teacher HuggingFaceTB/SmolLM2-1.7B-Instruct")
                     if name == "cross_tokenizer" else ("data/teacher.jsonl", "python generate_data.py"))
    assert err == (f"error: --data: no teacher data at the default '{path}' yet: run `{command}` first to write "
                   "it (or pass --data FILE)")


def test_an_explicit_missing_data_file_keeps_its_own_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "load_model", no_model_loads)
    with pytest.raises(common.DistillError, match=r"^--data: file 'nope.jsonl' not found$"):
        token_level.main(["--data", "nope.jsonl", "--kl", "reverse"])


def test_generate_then_bare_training_then_bare_eval_chain(kit, tmp_path, monkeypatch, capsys):
    # The blog's flow with the kit's models standing in for the hub's: generate_data.py writes where the training
    # script reads for the same --teacher, the run lands in runs/, and eval.py finds it there by itself.
    monkeypatch.chdir(tmp_path)
    teacher, student = str(kit["teacher"]), str(kit["student"])
    prompts = tmp_path / "problems.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n"
                               for i in range(4)))
    generate_data.main(["--teacher", teacher, "--dataset", str(prompts), "--max-new-tokens", "8"])
    assert len(common.read_jsonl(tmp_path / "data" / "teacher_teacher.jsonl")) == 4

    token_level.main(["--kl", "reverse", "--teacher", teacher, "--student", student, "--max-steps", "1"])
    run = tmp_path / "runs" / "token_level-reverse"
    assert json.loads((run / "run_config.json").read_text())["data"] == "data/teacher_teacher.jsonl"
    (tmp_path / "runs" / "unfinished" / "checkpoint-1").mkdir(parents=True)  # no model yet: not evaluated

    capsys.readouterr()
    evaluate.main(["--student", student, "--dataset", str(prompts), "--max-new-tokens", "4"])
    rows = common.read_jsonl(tmp_path / "results.jsonl")
    assert [row["model"] for row in rows] == [student, "runs/token_level-reverse"]
    assert all(row["n"] == 4 for row in rows)


def test_eval_without_runs_evaluates_the_base_student(tmp_path, capsys):
    assert evaluate.default_models("S", tmp_path / "runs") == ["S"]
    assert "evaluating the base student only" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--name", "x"], ["--model", "a", "b", "--save-predictions", "p.jsonl"]])
def test_eval_row_options_need_exactly_one_model(argv, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(argv)
    assert "give exactly one --model" in capsys.readouterr().err


# -- the recipe ------------------------------------------------------------------------------------------------

def test_tiny_blog_recipe_writes_the_whole_table(tmp_path, capsys):
    out = tmp_path / "blog"
    table = reproduce_blog.main(["--tiny", "--out", str(out)]).read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0] == ("| method | teacher | exact match at the end (95% CI) | Δ vs base "
                        "| held-out: end → best (step) | best checkpoint's exact match (95% CI) | training time "
                        "| loss start → end |")
    labels = ["base student (no distillation)"] + [label for label, *_ in reproduce_blog.METHODS.values()]
    assert [line.split(" | ")[0][2:] for line in lines[1:]] == labels
    for line in lines[1:]:
        assert re.search(r"\| \d+\.\d% \[\d+\.\d, \d+\.\d\] \|", line), line
    assert lines[1].endswith("| - | - | - | - | - |")
    for line in lines[2:]:  # every method: a difference to the base, the held-out cells, a time, a loss at both ends
        assert re.search(r"\| [+-]\d+\.\d pts \| \d+\.\d% → \d+\.\d% \(step \d+\) \| \d+\.\d% \[\d+\.\d, \d+\.\d\] \| "
                         r"\d+\.\d s \| \d+\.\d{3} → \d+\.\d{3} \|$", line), line
    assert "| student_llama3 |" in lines[-1] and lines[2].split(" | ")[1] == "teacher"
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = {row["name"]: row for row in common.read_jsonl(out / "results.jsonl")}
    assert sorted(results) == sorted(["base", *reproduce_blog.METHODS, *(f"{m}_best" for m in reproduce_blog.METHODS)])

    # Held-out early stopping: problems that are neither training nor test problems, tracked every 2 steps; the
    # best checkpoint is the best (earliest on a tie) of the logged evaluations, and the table shows both models.
    held_out = {q["prompt"] for q in common.load_prompt_dataset(str(out / "data" / "heldout.jsonl"))}
    trained = {row["messages"][-1]["content"] for row in common.read_jsonl(out / "data" / "teacher.jsonl")}
    tested = {q["prompt"] for q in common.load_prompt_dataset(str(out / "gsm8k_tiny" / "test.jsonl"))}
    assert held_out and trained and tested
    assert not held_out & trained and not held_out & tested
    for line, name in zip(lines[2:], reproduce_blog.METHODS):
        run = out / "runs" / name
        config = json.loads((run / "run_config.json").read_text())
        assert (config["eval_problems"], config["eval_every"], config["save_best"]) == (
            str(out / "data" / "heldout.jsonl"), 2, "eval_exact_match")
        logged = {row["step"]: row["eval_exact_match"] for row in common.read_jsonl(run / "metrics.jsonl")
                  if "eval_exact_match" in row}
        assert list(logged) == [2, 4]
        best = json.loads((run / "best" / "best.json").read_text())
        assert best["value"] == logged[best["step"]] == max(logged.values())
        assert all(value < best["value"] for step, value in logged.items() if step < best["step"])
        cells = line.split(" | ")
        assert cells[4] == f"{logged[4]:.1%} → {best['value']:.1%} (step {best['step']})"
        assert cells[2].startswith(f"{results[name]['exact_match']:.1%} [")
        assert cells[5].startswith(f"{results[name + '_best']['exact_match']:.1%} [")
        assert results[name + "_best"]["model"] == str(run / "best")

    # What the tiny run stands in for: sampling in on_policy, and two tokenizers for cross_tokenizer.
    assert any(row["on_policy"] for row in common.read_jsonl(out / "runs" / "on_policy" / "metrics.jsonl"))
    config = json.loads((out / "runs" / "cross_tokenizer" / "run_config.json").read_text())
    assert config["lora"] and config["lora_target_modules"] == "q_proj,k_proj,v_proj,o_proj"
    assert cache_teacher.vocab_fingerprint(models.load_tokenizer(config["teacher"])) != cache_teacher.vocab_fingerprint(
        models.load_tokenizer(config["student"]))

    # Re-running reuses every finished step and writes the same table.
    capsys.readouterr()
    assert reproduce_blog.main(["--tiny", "--out", str(out)]).read_text() == table
    log = capsys.readouterr().out
    assert log.count("finished earlier with these settings, reused") == 4
    assert log.count("evaluated earlier, reused") == 9
    assert "$ python eval.py" not in log and "0 to generate" in log


def test_the_gpu_recipe_is_the_blogs_setup(tmp_path, monkeypatch):
    # The real recipe needs a GPU and the hub; its command lines are checked here, as the scripts parse them.
    monkeypatch.chdir(tmp_path)
    setup = reproduce_blog.blog_setup()
    (tmp_path / "data").mkdir()
    write_rows(tmp_path / setup.held_out_path, 1)  # the training scripts check that --eval-problems exists
    gen = generate_data.parse_args(["--teacher", setup.teachers["uld"], *setup.generate])
    assert (gen.output, gen.num_examples, gen.temperature, gen.split) == (SMOL_DATA, 500, 0, "train")
    for name, (_, script, _, teacher) in reproduce_blog.METHODS.items():
        args = script.parse_args([*reproduce_blog.method_argv(setup, name), "--output-dir", "o"])
        assert (args.student, args.teacher) == ("Qwen/Qwen2.5-0.5B", setup.teachers[teacher])
        assert args.data == common.default_data_path(args.teacher)  # the file the bare commands read too
        assert (args.epochs, args.lora, args.lora_r, args.lora_target_modules) == (
            15, True, 16, "q_proj,k_proj,v_proj,o_proj")
        steps_per_epoch, total = training.count_steps(common.BLOG_TRAIN_PROBLEMS, args, 1)
        assert (args.eval_problems, args.eval_every, args.save_best) == (
            "data/gsm8k_heldout.jsonl", steps_per_epoch, "eval_exact_match")  # tracked every epoch
        assert (steps_per_epoch, total, args.eval_max_new_tokens) == (63, 945, 512)
    assert setup.teachers == {"main": "Qwen/Qwen2.5-3B-Instruct", "uld": "HuggingFaceTB/SmolLM2-1.7B-Instruct"}
    scored = evaluate.parse_args(["--model", "m", *setup.eval])
    assert (scored.dataset, scored.split, scored.num_examples) == ("openai/gsm8k", "test", 100)
    # held out: the 100 train problems after the 500 the teachers answer (so not the test split's), every epoch
    assert setup.held_out == dict(dataset="openai/gsm8k", config="main", split="train", skip=gen.num_examples,
                                  count=100)
    assert scored.max_new_tokens == 512


def test_held_out_problems_are_neither_training_nor_test_problems(tmp_path, capsys):
    def problems(path, questions):
        path.write_text("".join(json.dumps({"question": q, "answer": f"#### {i}"}) + "\n"
                                for i, q in enumerate(questions)))
        return str(path)

    train = problems(tmp_path / "train.jsonl", [f"train {i}?" for i in range(4)] + [
        "held 0?", "train  1?", "test 2?", "held 1?", "held 2?"])  # rows 4-8 are the held-out candidates
    test = problems(tmp_path / "test.jsonl", [f"test {i}?" for i in range(3)])
    setup = reproduce_blog.Setup(
        student="s", teachers={"main": "t"}, data={}, generate=["--dataset", train, "--num-examples", "4"], train=[],
        on_policy=[], eval=["--dataset", test, "--num-examples", "all"], about="",
        held_out=dict(dataset=train, config=None, split="train", skip=4, count=5),
        held_out_path=str(tmp_path / "data" / "heldout.jsonl"), track=[])
    path = reproduce_blog.write_held_out(setup)
    # 'train  1?' is 'train 1?' with another space: the same question, dropped like the test one
    assert [q["prompt"] for q in common.load_prompt_dataset(str(path))] == ["held 0?", "held 1?", "held 2?"]
    assert "3 held-out problems, none of them a training or test problem (2 dropped for being one)" in (
        capsys.readouterr().out)

    kept, dropped = reproduce_blog.held_out_problems([{"prompt": "a"}], [{"prompt": " a "}])
    assert (kept, dropped) == ([], 1)
    setup.held_out = dict(setup.held_out, skip=0, count=4)  # every candidate is a training problem
    with pytest.raises(common.DistillError, match="all 4 from .* are training or test problems"):
        reproduce_blog.write_held_out(setup)


def test_makefile_has_the_blog_target():
    makefile = (ROOT / "Makefile").read_text()
    assert "\nblog: $(VENV)/.installed\n\t$(PY) reproduce_blog.py $(if $(BLOG_TINY),--tiny)\n" in makefile
