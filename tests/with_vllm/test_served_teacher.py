"""A teacher served by a real vLLM server on localhost (--teacher-url): the top-K cache it fills equals the local
teacher's, on_policy.py trains from it like token_level.py from that cache, the server's tokenizer is checked, and
the failures a network brings stop in one line and resume exactly."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

import cache_teacher
import common
import on_policy
import served_teacher
import token_level
from conftest import write_rows as write_problem_rows
from models import load_tokenizer


def shards(folder):
    tensors = [load_file(p) for p in sorted(folder.glob("shard-*.safetensors"))]
    return {k: torch.cat([t[k] for t in tensors]) for k in tensors[0]}


def test_cache_from_the_server_equals_the_local_teachers(vkit, teacher_server, tmp_path):
    data = write_problem_rows(tmp_path / "d.jsonl", 10)
    common_args = ["--teacher", str(vkit["teacher"]), "--data", str(data), "--top-k", "16", "--temperatures", "1",
                   "--logprob-dtype", "float32", "--batch-size", "4", "--shard-rows", "6", "--dtype", "float32"]
    cache_teacher.main([*common_args, "--output", str(tmp_path / "local")])
    manifest = cache_teacher.main([*common_args, "--output", str(tmp_path / "served"), "--teacher-url", teacher_server])
    assert manifest["teacher_url"] == teacher_server and manifest["tokens"] > 100
    local, served = shards(tmp_path / "local"), shards(tmp_path / "served")
    assert torch.equal(local["token_ids"], served["token_ids"]) and torch.equal(local["offsets"], served["offsets"])
    assert torch.equal(local["topk_ids"], served["topk_ids"])
    assert torch.allclose(local["topk_logprobs"], served["topk_logprobs"], atol=1e-4)
    assert torch.allclose(local["tail_logmass"], served["tail_logmass"], atol=1e-4)


def test_refusals_are_one_line(vkit, teacher_server, tmp_path):
    data = write_problem_rows(tmp_path / "d.jsonl", 2)
    args = ["--teacher", str(vkit["teacher"]), "--data", str(data), "--temperatures", "1"]
    # the server was started with --max-logprobs 20
    with pytest.raises(common.DistillError, match="max-logprobs"):
        cache_teacher.main([*args, "--top-k", "32", "--output", str(tmp_path / "a"), "--teacher-url", teacher_server])
    with pytest.raises(common.DistillError, match="T=1 only"):
        cache_teacher.main([*args[:-2], "--temperatures", "1", "2", "--top-k", "8", "--output", str(tmp_path / "b"),
                            "--teacher-url", teacher_server])
    other = load_tokenizer(str(vkit["student_llama3"]))
    with pytest.raises(common.DistillError, match="vocabulary differs"):
        served_teacher.ServedTeacher(teacher_server, top_k=4).check_tokenizer(other)


class Proxy:
    """A local HTTP proxy in front of the vLLM server that can fail on purpose: `mode` "ok", "503" (every request
    answered 503), "slow" (waits `delay` seconds first) or "trim" (keeps only 2 log-probabilities per position)."""

    def __init__(self, target: str):
        proxy = self
        self.mode, self.delay, self.completions, self.fail_after = "ok", 0.0, 0, None

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, body=None):
                if self.path == "/v1/completions":
                    proxy.completions += 1
                    if proxy.fail_after is not None and proxy.completions > proxy.fail_after:
                        proxy.mode = "503"
                if proxy.mode == "503":
                    self.send_response(503)
                    self.end_headers()
                    return
                if proxy.mode == "slow":
                    threading.Event().wait(proxy.delay)
                request = urllib.request.Request(target + self.path, data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request) as response:
                    answer = response.read()
                if proxy.mode == "trim" and self.path == "/v1/completions":
                    parsed = json.loads(answer)
                    for choice in parsed["choices"]:
                        choice["prompt_logprobs"] = [
                            None if pos is None else dict(sorted(pos.items(), key=lambda e: e[1]["rank"])[:2])
                            for pos in choice["prompt_logprobs"]]
                    answer = json.dumps(parsed).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def do_GET(self):
                self._forward()

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers["Content-Length"])))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(teacher_server):
    p = Proxy(teacher_server)
    yield p
    p.close()


def test_network_failures_retry_then_stop_in_one_line(vkit, proxy, monkeypatch):
    naps = []
    tokenizer = load_tokenizer(str(vkit["teacher"]))
    ids = tokenizer("12 + 5 = 17")["input_ids"]
    client = served_teacher.ServedTeacher(proxy.url, top_k=4, retries=3, timeout=1.0, sleep=naps.append)
    assert client.topk_rows([ids], [[1] * len(ids)])[0]["topk_ids"].shape == (len(ids) - 1, 4)
    proxy.mode = "503"
    with pytest.raises(common.DistillError, match=r"no answer after 4 tries \(HTTP 503"):
        client.topk_rows([ids], [[1] * len(ids)])
    assert naps == [1.0, 2.0, 4.0]  # exponential backoff
    proxy.mode, proxy.delay = "slow", 3.0
    with pytest.raises(common.DistillError, match="timed out"):
        client.topk_rows([ids], [[1] * len(ids)])
    proxy.mode = "trim"
    with pytest.raises(common.DistillError, match="2 log-probabilities per token where 4 were asked"):
        client.topk_rows([ids], [[1] * len(ids)])
    down = served_teacher.ServedTeacher("http://127.0.0.1:9", top_k=4, retries=2, sleep=naps.append, model="m")
    with pytest.raises(common.DistillError, match="is the vLLM server up"):  # nothing listens: not up yet
        down.topk_rows([ids], [[1] * len(ids)])


def on_policy_args(vkit, data, out, url, *extra):
    return ["--student", str(vkit["student"]), "--teacher", str(vkit["teacher"]), "--data", str(data),
            "--output-dir", str(out), "--teacher-url", url, "--teacher-top-k", "8", "--max-steps", "4",
            "--batch-size", "2", "--grad-accum", "2", "--lr", "3e-3", "--max-new-tokens", "10", "--log-every", "100",
            "--dtype", "float32", "--teacher-retries", "1", *extra]


def losses_of(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_served_teacher_stops_and_resumes_exactly(vkit, teacher_server, proxy, tmp_path, monkeypatch):
    monkeypatch.setattr(served_teacher, "_FIRST_BACKOFF", 0.01)
    data = write_problem_rows(tmp_path / "d.jsonl", 16)
    on_policy.main(on_policy_args(vkit, data, tmp_path / "whole", teacher_server, "--lmbda", "0.5"))
    proxy.fail_after = 5  # two steps of two micro-batches, then the server "goes away" in the third
    with pytest.raises(common.DistillError, match=r"stopped after step 2 of 4: saved .*checkpoint-2; --resume"):
        on_policy.main(on_policy_args(vkit, data, tmp_path / "cut", proxy.url, "--lmbda", "0.5"))
    proxy.fail_after, proxy.mode = None, "ok"
    on_policy.main(on_policy_args(vkit, data, tmp_path / "cut", proxy.url, "--lmbda", "0.5", "--resume",
                                  str(tmp_path / "cut")))
    assert losses_of(tmp_path / "cut") == pytest.approx(losses_of(tmp_path / "whole"), rel=1e-5)


def test_off_policy_served_teacher_trains_like_a_topk_cache(vkit, teacher_server, tmp_path):
    """on_policy.py --lmbda 0 --teacher-url: the same losses as token_level.py from a top-K cache of the same K."""
    data = write_problem_rows(tmp_path / "d.jsonl", 8)
    cache_teacher.main(["--teacher", str(vkit["teacher"]), "--data", str(data), "--top-k", "8", "--temperatures",
                        "1", "--logprob-dtype", "float32", "--dtype", "float32", "--output", str(tmp_path / "c")])
    on_policy.main(on_policy_args(vkit, data, tmp_path / "served", teacher_server, "--lmbda", "0", "--kl",
                                  "reverse"))
    token_level.main(["--student", str(vkit["student"]), "--data", str(data), "--output-dir", str(tmp_path / "tl"),
                      "--teacher-cache", str(tmp_path / "c"), "--alpha", "0", "--kl", "reverse", "--max-steps", "4",
                      "--batch-size", "2", "--grad-accum", "2", "--lr", "3e-3", "--log-every", "100",
                      "--dtype", "float32", "--temperature", "1"])
    assert losses_of(tmp_path / "served") == pytest.approx(losses_of(tmp_path / "tl"), rel=1e-4)


def token_level_args(vkit, data, out, *extra):
    return ["--student", str(vkit["student"]), "--data", str(data), "--output-dir", str(out), "--alpha", "0.2",
            "--kl", "reverse", "--max-steps", "4", "--batch-size", "2", "--grad-accum", "2", "--lr", "3e-3",
            "--log-every", "100", "--dtype", "float32", "--temperature", "1", *extra]


def test_token_level_served_teacher_trains_like_a_topk_cache_and_resumes(vkit, teacher_server, proxy, tmp_path,
                                                                         monkeypatch):
    """token_level.py --teacher-url (teachers.ServedRows): the losses of a top-K cache of the same K written from the
    local teacher; a server gone mid-run stops with a checkpoint and --resume ends with the same losses."""
    monkeypatch.setattr(served_teacher, "_FIRST_BACKOFF", 0.01)
    data = write_problem_rows(tmp_path / "d.jsonl", 8)
    cache_teacher.main(["--teacher", str(vkit["teacher"]), "--data", str(data), "--top-k", "8", "--temperatures",
                        "1", "--logprob-dtype", "float32", "--dtype", "float32", "--output", str(tmp_path / "c")])
    token_level.main(token_level_args(vkit, data, tmp_path / "cached", "--teacher-cache", str(tmp_path / "c")))
    served = ["--teacher", str(vkit["teacher"]), "--teacher-url", teacher_server, "--teacher-top-k", "8",
              "--teacher-retries", "1"]
    token_level.main(token_level_args(vkit, data, tmp_path / "served", *served))
    assert losses_of(tmp_path / "served") == pytest.approx(losses_of(tmp_path / "cached"), rel=1e-4)
    via_proxy = [*served[:2], "--teacher-url", proxy.url, *served[4:]]
    proxy.fail_after = 6  # the pre-flight, two steps of two micro-batches and one of the third, then "gone"
    with pytest.raises(common.DistillError, match=r"stopped after step 2 of 4: saved .*checkpoint-2; --resume"):
        token_level.main(token_level_args(vkit, data, tmp_path / "cut", *via_proxy))
    proxy.fail_after, proxy.mode = None, "ok"
    token_level.main(token_level_args(vkit, data, tmp_path / "cut", *via_proxy, "--resume", str(tmp_path / "cut")))
    assert losses_of(tmp_path / "cut") == pytest.approx(losses_of(tmp_path / "served"), rel=1e-5)
