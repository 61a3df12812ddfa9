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

.PHONY: demo test lint clean blog notebook

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
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The interactive explainer (marimo, a dev-only dependency) on demo_out/: run `make demo` first.
notebook: $(VENV)/.installed
	$(VENV)/bin/marimo edit notebooks/explainer.py

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
