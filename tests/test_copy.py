"""Copying a script into another project works with the files the README's table names for it, and only those:
each training script is copied with exactly them into an empty folder, where it prints --help and trains 2 steps."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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


# One interpreter runs every copy (imports are most of a tiny run's time), each from its own folder: before a copy
# runs, the project's modules an earlier copy imported are dropped from sys.modules and the copy's folder is the
# only place on sys.path they can come from. For each: --help as `python SCRIPT --help` runs it (argparse exits 0
# after printing), then a 2-step run through the same file, as `python SCRIPT ARGS` runs it.
DRIVER = """
import contextlib, importlib, io, json, runpy, sys, traceback
from pathlib import Path
local, plan = set(json.loads(sys.argv[1])), json.loads(sys.argv[2])
for project, script, args in plan:
    for name in [m for m in sys.modules if m in local]:
        del sys.modules[name]
    sys.path[0] = project
    importlib.invalidate_caches()
    log = Path(project) / "log.txt"
    try:
        sys.argv, help_text = [script, "--help"], io.StringIO()
        try:
            with contextlib.redirect_stdout(help_text):
                runpy.run_path(str(Path(project) / script), run_name="__main__")
        except SystemExit as done:
            assert done.code in (0, None), done.code
        sys.argv = [script, *args]
        runpy.run_path(str(Path(project) / script), run_name="__main__")
        imported = sorted({m.__file__ for name, m in sys.modules.items() if name in local})
        log.write_text(json.dumps({"ok": True, "imported": imported, "help": help_text.getvalue()}))
    except BaseException:
        log.write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))
"""


@pytest.fixture(scope="module")
def copies(kit, tmp_path_factory):
    """{script: its project folder}, after the driver above ran every training script copied there."""
    root = tmp_path_factory.mktemp("copies")
    data = write_rows(root / "d.jsonl", 8)
    plan, folders = [], {}
    for script in TRAINING:
        project = folders[script] = root / script.removesuffix(".py")
        project.mkdir()
        for name in {script} | readme_table()[script]:
            shutil.copy(ROOT / name, project / name)
        args = ["--student", str(kit["student"]), "--data", str(data), "--max-steps", "2", "--batch-size", "2",
                "--output-dir", str(project / "run")]
        if script in ("token_level.py", "on_policy.py"):
            args += ["--teacher", str(kit["teacher"])]
        if script == "on_policy.py":
            args += ["--max-new-tokens", "8"]
        if script == "cross_tokenizer.py":
            args += ["--teacher", str(kit["teacher_llama"])]
        plan.append((str(project), script, args))
    local = [p.stem for p in ROOT.glob("*.py")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}  # nothing importable from the repository
    run = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(local), json.dumps(plan)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return folders


@pytest.mark.parametrize("script", TRAINING)
def test_a_copied_script_runs_with_the_files_listed(copies, script):
    project = copies[script]
    log = json.loads((project / "log.txt").read_text())
    assert log["ok"], log.get("error")
    # every project module it ran with came from its own folder
    assert log["imported"] and all(Path(f).parent == project for f in log["imported"]), log["imported"]
    assert "checkpoints and output:" in log["help"]
    assert (project / "run" / "model.safetensors").exists()
