"""Copying a script into another project works with the files the README's table names for it, and only those:
each training script is copied with exactly them into an empty folder, where it prints --help and trains 2 steps."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, write_rows

TRAINING = ("sequence_level.py", "token_level.py", "on_policy.py", "cross_tokenizer.py")


def readme_table() -> dict[str, set[str]]:
    """script -> the modules the README's copy table says it needs beside it."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("**Copying a script into your project.**"):]
    needs = {}
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| `"))
    for line in lines[start:]:
        if not line.startswith("| `"):
            break
        scripts, files = line.strip("|").split("|")[:2]
        for script in re.findall(r"`([\w.]+\.py)`", scripts):
            needs[script] = set(re.findall(r"`([\w.]+\.py)`", files))
    return needs


def local_imports(script: str) -> set[str]:
    """The project's modules `script` imports, directly or through them (any import statement, at any depth)."""
    local = {p.name for p in ROOT.glob("*.py")}
    seen, todo = set(), [script]
    while todo:
        tree = ast.parse((ROOT / todo.pop()).read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                module = name.split(".")[0] + ".py"
                if module in local and module not in seen and module != script:
                    seen.add(module)
                    todo.append(module)
    return seen


@pytest.mark.parametrize("script", TRAINING)
def test_the_readme_lists_exactly_what_a_script_imports(script):
    assert readme_table()[script] == local_imports(script)


@pytest.mark.parametrize("script", TRAINING)
def test_a_copied_script_runs_with_the_files_listed(kit, tmp_path, script):
    project = tmp_path / "project"
    project.mkdir()
    for name in {script} | readme_table()[script]:
        shutil.copy(ROOT / name, project / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}  # nothing importable from the repository
    data = write_rows(tmp_path / "d.jsonl", 8)
    args = ["--student", str(kit["student"]), "--data", str(data), "--max-steps", "2", "--batch-size", "2",
            "--output-dir", str(tmp_path / "run")]
    if script in ("token_level.py", "on_policy.py"):
        args += ["--teacher", str(kit["teacher"])]
    if script == "on_policy.py":
        args += ["--max-new-tokens", "8"]
    if script == "cross_tokenizer.py":
        args += ["--teacher", str(kit["teacher_llama"])]
    # One interpreter for both (imports are most of a tiny run's time): --help as `python SCRIPT --help` runs it
    # (argparse exits 0 after printing), then the 2-step run through the same file's main().
    both = (f"import runpy, sys\nsys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit as done:\n"
            f"    assert done.code in (0, None), done.code\nprint('--- end of help ---', flush=True)\n"
            f"sys.argv = [{script!r}, *{args!r}]\nrunpy.run_path({script!r}, run_name='__main__')\n")
    run = subprocess.run([sys.executable, "-c", both], cwd=project, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    help_text = run.stdout.split("--- end of help ---")[0]
    assert "checkpoints and output:" in help_text
    assert (tmp_path / "run" / "model.safetensors").exists()
