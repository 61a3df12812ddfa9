"""eval.py --samples: pass@k (Chen et al.'s estimator) and majority vote against brute-force counting, and the
sampled evaluation end to end on a tiny model (reproducible draws, the table's columns, saved samples)."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

import common
import eval as evaluate
import generation
import models
import sequence_level
from conftest import write_rows


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 1, 1), (5, 2, 3), (6, 3, 2), (6, 6, 4), (7, 1, 7), (8, 3, 5),
                                   (4, 2, 4), (10, 1, 3)])
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_draw(n, c, k):
    draws = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    want = sum(any(draws[i] for i in s) for s in subsets) / len(subsets)
    assert evaluate.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in ((3, 4, 1), (3, 1, 4), (3, 1, 0)):
        with pytest.raises(ValueError):
            evaluate.pass_at_k(n, c, k)


@pytest.mark.parametrize("answers,want", [
    (["3", "4", "3"], "3"),
    (["4", "3", "3", "4"], "4"),          # a tie goes to the answer seen first
    ([None, None, "7"], "7"),             # no final answer: no vote
    ([None, None], None),
    (["1", None, "2", "2", None, None], "2"),
])
def test_majority_vote(answers, want):
    assert evaluate.majority_vote(answers) == want


def test_score_samples_against_counting_by_hand():
    samples = [
        ["#### 3", "#### 3", "#### 4"],      # 2/3 correct, vote 3: correct
        ["#### 5", "#### 6", "#### 6"],      # 1/3 correct, vote 6: wrong
        ["5", "no idea", "#### 2"],          # strict: only '#### 2' is an answer, wrong; lenient '5' does not count
        ["#### 1", "#### 2", "#### 9"],      # 1/3 correct (9), tie goes to 1: wrong
        ["#### 8", "#### 8", "#### 8"],      # no reference number: not scored
    ]
    references = ["#### 3", "#### 5", "#### 5", "#### 9", "none"]
    got = evaluate.score_samples(samples, references)
    # independently: strict answers by regex rule, votes with Counter (first-seen order for ties)
    per_problem = []
    for replies, ref in zip(samples[:4], references[:4]):
        answers = [generation.extract_answer(r, strict=True) for r in replies]
        ref = generation.extract_answer(ref)
        counts = Counter(a for a in answers if a is not None)
        top = max(counts.values()) if counts else 0
        vote = next((a for a in answers if a is not None and counts[a] == top), None)
        per_problem.append((any(a == ref for a in answers), vote == ref, sum(a == ref for a in answers) / 3))
    assert [p[:2] for p in per_problem] == [(True, True), (True, False), (False, False), (True, False)]
    assert got["n"] == 4 and got["samples"] == 3
    assert got["pass_at_k_correct"] == 3 and got["maj_at_k_correct"] == 1
    assert got["pass_at_k"] == 3 / 4 and got["maj_at_k"] == 1 / 4
    assert got["pass_at_k_ci"] == pytest.approx(generation.wilson_interval(3, 4))
    assert got["maj_at_k_ci"] == pytest.approx(generation.wilson_interval(1, 4))
    assert got["sample_accuracy"] == pytest.approx(sum(p[2] for p in per_problem) / 4)
    with pytest.raises(common.DistillError, match="same number"):
        evaluate.score_samples([["#### 1"], ["#### 1", "#### 2"]], ["#### 1", "#### 1"])


@pytest.fixture(scope="module")
def solver(kit, tmp_path_factory):
    """A student that has memorized 4 problems (greedy 100%), and those problems as an eval.py dataset."""
    root = tmp_path_factory.mktemp("sampled")
    data = write_rows(root / "d.jsonl", 4, system=common.DEFAULT_SYSTEM_PROMPT)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": r["messages"][-1]["content"], "answer": r["completion"]})
                                + "\n" for r in rows))
    sequence_level.main(["--student", str(kit["student"]), "--data", str(data), "--output-dir", str(root / "m"),
                         "--max-steps", "150", "--batch-size", "4", "--lr", "1e-2", "--warmup-ratio", "0"])
    return root / "m", problems


def test_sampled_scores_are_seeded_and_leave_the_callers_rng_alone(solver):
    import torch

    model, tokenizer = models.load_model(str(solver[0]))
    problems = common.load_prompt_dataset(str(solver[1]))
    settings = dict(system_prompt=common.DEFAULT_SYSTEM_PROMPT, max_new_tokens=24, batch_size=16,
                    keep_replies=True)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    hot = evaluate.sampled_scores(model, tokenizer, problems, 3, 3.0, seed=1, **settings)
    assert torch.equal(torch.rand(3), before)  # the draws came from a forked generator
    assert evaluate.sampled_scores(model, tokenizer, problems, 3, 3.0, seed=1, **settings) == hot
    other = evaluate.sampled_scores(model, tokenizer, problems, 3, 3.0, seed=2, **settings)
    assert other["replies"] != hot["replies"]  # T=3 over a tiny vocabulary: two seeds never draw alike
    assert [len(r) for r in hot["replies"]] == [3] * len(problems)
    # the scores are score_samples' on the replies drawn
    rescored = evaluate.score_samples(hot["replies"], [p["answer"] for p in problems])
    assert {k: hot[k] for k in rescored} == rescored
    assert (hot["sample_temperature"], hot["sample_seed"], hot["sample_top_p"]) == (3.0, 1, 1.0)
    with pytest.raises(common.DistillError, match="temperature > 0"):
        evaluate.sampled_scores(model, tokenizer, problems, 3, 0.0, **settings)


def test_eval_samples_end_to_end(solver, tmp_path, capsys):
    trained, problems = solver
    out = tmp_path / "results.jsonl"
    for name, temperature in (("cool", "0.05"), ("hot", "8")):
        evaluate.main(["--model", str(trained), "--name", name, "--dataset", str(problems), "--output", str(out),
                       "--max-new-tokens", "48", "--samples", "4", "--temperature", temperature, "--seed", "3",
                       "--save-predictions", str(tmp_path / f"{name}.jsonl")])
    results = {r["name"]: r for r in common.read_jsonl(out)}
    for name, row in results.items():
        assert row["exact_match"] == 1.0 and row["samples"] == 4  # greedy is unchanged by sampling
        saved = common.read_jsonl(row["predictions"])
        assert all(len(p["samples"]) == 4 for p in saved)
        # pass@4 and maj@4 recounted from the saved samples
        passed = sum(any(a == p["reference"] for a in p["sample_answers"]) for p in saved)
        voted = sum(Counter(a for a in p["sample_answers"] if a).most_common(1)[0][0] == p["reference"]
                    if any(p["sample_answers"]) else False for p in saved)
        assert row["pass_at_k_correct"] == passed and row["maj_at_k_correct"] == voted, name
        assert row["pass_at_k_ci"] == pytest.approx(list(generation.wilson_interval(passed, len(saved))))
        assert [p["sample_answers"] for p in saved] == [[generation.extract_answer(r, strict=True)
                                                         for r in p["samples"]] for p in saved]
    # near-greedy sampling keeps the memorized answers; at T=8 over this vocabulary the replies are noise
    assert results["cool"]["pass_at_k"] == results["cool"]["maj_at_k"] == 1.0
    assert results["hot"]["maj_at_k"] == 0.0 and results["hot"]["sample_accuracy"] < 0.2
    table = capsys.readouterr().out
    assert "pass@k (95% CI) | maj@k (95% CI) | k, T |" in table
    assert "| cool | 100.0% [51.0, 100.0] |" in table and "| 100.0% [51.0, 100.0] | 100.0% [51.0, 100.0] | 4, 0.05 |" \
        in table


def test_table_without_samples_is_unchanged_and_mixed_rows_show_dashes():
    plain = {"name": "plain", **evaluate.score_row(["#### 5"] * 2, ["#### 5"] * 2)}
    assert "pass@k" not in evaluate.markdown_table([plain])
    sampled = {**plain, "name": "sampled", **evaluate.score_samples([["#### 5", "#### 4"]] * 2, ["#### 5"] * 2),
               "sample_temperature": 0.7}
    table = evaluate.markdown_table([plain, sampled])
    assert table.splitlines()[2].endswith("| - | - | - |")
    assert table.splitlines()[3].endswith(" 2, 0.7 |")
