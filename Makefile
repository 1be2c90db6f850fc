# t2i — `make help` lists the targets. `make demo` and `make test` install first when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= outputs/demo
# Pinned packages with no wheel for this Python; built from source with the lock's Cython (ruDALL-E's tokenizer).
SOURCE_ONLY := youtokentome==1.0.6

.DEFAULT_GOAL := help
.PHONY: help install demo app test test-full lint bench lock clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv from requirements.lock (does nothing when up to date)
# The lock is the whole environment (pip freeze), so it installs with --no-deps: the compat peers
# (taming-transformers-rom1504, dall-e) declare stale requirements that must not downgrade ours, and every
# gradio release declares pillow<13 while the lock's pillow is 13.0.0 (t2i-app and its tests run on it).

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "t2i needs Python >= 3.10"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation $(SOURCE_ONLY)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)  ## the whole Shapes chain: VQGAN -> tokenize -> transformer -> CLIP -> generate + rerank -> eval
	$(BIN)/t2i-demo output=$(DEMO)

app: $(STAMP)  ## the web page (t2i-app) over the demo's checkpoints on http://127.0.0.1:7860 (after make demo)
	@test -f $(DEMO)/transformer/metrics.json || { echo "make app serves the checkpoints of make demo, and $(DEMO) holds none yet:"; \
	  echo "  run: make demo    (or: $(BIN)/t2i-app ckpt=<a transformer .ckpt> rerank.ckpt=<a CLIP .ckpt>)"; exit 1; }
	$(BIN)/t2i-app demo=$(DEMO)

test: $(STAMP)  ## fast test suite (< 10 min on 2 CPU cores)
	$(BIN)/python -m pytest -q

test-full: $(STAMP)  ## every test, including the `slow` ones
	$(BIN)/python -m pytest -q -m "not gpu"

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check t2i tests experiments

bench: $(STAMP)  ## data-loading benchmark (writes experiments/data_loading/RESULTS.md)
	$(BIN)/python experiments/data_loading/bench.py --out experiments/data_loading/RESULTS.md

lock: $(STAMP)  ## re-pin requirements.lock from the current .venv
	{ echo "# Exact tested set (Python 3.11, 2-core CPU). Regenerate with: make lock"; \
	  $(BIN)/python -m pip freeze --all --exclude-editable | grep -v '^#' | grep -v '^-e' | grep -v '^pip==' | grep -v '^youtokentome=='; } > requirements.lock

clean:  ## remove caches and outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
