# imgcls: `make demo` and `make test` from a fresh clone; `make` lists every target.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# Keep Keras, MLflow and BentoML off the network and out of $HOME.
export MLFLOW_DISABLE_TELEMETRY := true
export BENTOML_DO_NOT_TRACK := true
export DO_NOT_TRACK := true
export TF_CPP_MIN_LOG_LEVEL := 2
export KERAS_HOME := $(CURDIR)/.imgcls/keras
# Python writes the bytecode of what it imports (the install leaves that to first use): with
# PYTHONDONTWRITEBYTECODE set, each of the ~240 Python processes `make test` starts compiled
# TensorFlow, Keras, MLflow and BentoML again (two service test modules: 108 s, 37 s without).
unexport PYTHONDONTWRITEBYTECODE

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint format docs peers bench bench-train bench-calibration bench-serve bench-runtime bench-predict bench-memory bench-burst bench-rollout bench-soak bench-explain bench-gpu-pack bench-gpu-cpu browser postgres compose-config clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# --no-compile: Python compiles what is imported, on first use; compiling every installed file
# (TensorFlow's included) took more than half of the install.
$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile -c requirements.lock -e ".[cpu,dev]"
	touch $@

install: $(BIN)/.installed ## create .venv and install the pinned dependencies

$(BIN)/.peers-installed: $(BIN)/.installed bench/peers/requirements.txt
	$(BIN)/pip install -q --no-compile -c requirements.lock -r bench/peers/requirements.txt
	touch $@

peers: $(BIN)/.peers-installed ## LitServe and Ray Serve, the serving benchmark's peers (pinned in bench/peers/requirements.txt)

browser: ## install Debian's chromium for the page tests (needs root; skipped otherwise)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) ; } \
	  || echo "chromium not installed: browser tests will be skipped"

postgres: ## install Debian's PostgreSQL 15 server for the team-stack tests (needs root; skipped otherwise)
	@[ -x /usr/lib/postgresql/15/bin/postgres ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -q postgresql >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null)) ; } \
	  || echo "postgresql not installed: team-stack tests will be skipped (they fail under CI=true)"

demo: install ## train, register, promote and serve the digits demo, then show a prediction
	$(BIN)/imgcls demo

# Both cores: two pytest-xdist workers; tests/xdist_groups.py puts the tests that must share a
# worker (one team stack, a module's servers, the timing tests) in one xdist_group each.
XDIST := -n 2 --dist loadgroup

test: install peers browser postgres ## run the test suite on both cores (about 11 minutes on 2 AVX-512 cores, install included)
	$(BIN)/pytest -q $(XDIST) --durations=15

test-fast: install ## the suite without the slow tests
	$(BIN)/pytest -q $(XDIST) -m "not slow"

docs: install ## build the docs site into docs/_build/html (warnings are errors)
	$(BIN)/sphinx-build -E -W --keep-going -n -q -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

lint: install ## ruff lint and format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench-train: install ## training quality and speed benchmarks (needs ../shared), see docs/benchmarks.md
	$(BIN)/python -m bench.train_bench

bench-calibration: install ## ECE and NLL before/after temperature scaling on CIFAR-10 (needs ../shared), see docs/benchmarks.md
	$(BIN)/python -m bench.calibration_bench

bench-serve: install peers ## the service beside LitServe, Ray Serve and mlflow, 3 rounds (~15 min), see docs/benchmarks.md
	$(BIN)/python -m bench.serve_bench

bench-runtime: install peers ## Keras against OpenVINO and ONNX Runtime on ResNet50 (~5 min), see docs/benchmarks.md
	$(BIN)/python -m bench.runtime_bench

bench-predict: install ## imgcls predict on a folder, Keras against the compiled build (~5 min), see docs/benchmarks.md
	$(BIN)/python -m bench.predict_bench

bench-memory: install ## HTTP fronts' memory under worst-case uploads, JPEG draft speedup, see docs/benchmarks.md
	$(BIN)/python -m bench.memory_bench

bench-burst: install ## a lone request's latency after bursts (c=1, 32, 1, 32, 1), see docs/benchmarks.md
	$(BIN)/python -m bench.burst_bench

bench-rollout: install ## promote/roll back under load: swap times, p99, memory, see docs/benchmarks.md
	$(BIN)/python -m bench.rollout_bench

bench-explain: install ## /predict p99 under 50 concurrent /explain (overload shedding), see docs/benchmarks.md
	$(BIN)/python -m bench.explain_bench

# The GPU run's wheelhouse (issue 11): CPython 3.12 on the GPU machine by default;
# `make bench-gpu-pack PYTHON_VERSION=3.11 GPU_WHEELS=.gpu-wheels-311` builds the CPU proof's.
PYTHON_VERSION ?= 3.12
GPU_WHEELS ?= $(if $(filter 3.12,$(PYTHON_VERSION)),.gpu-wheels,.gpu-wheels-$(subst .,,$(PYTHON_VERSION)))
bench-gpu-pack: install ## wheels the GPU benchmark carries (checked: resolves offline, fits 64 MiB)
	$(BIN)/python -m bench.gpu_pack --python-version $(PYTHON_VERSION) --dest $(GPU_WHEELS) \
	  $(if $(filter 3.12,$(PYTHON_VERSION)),,--provided-from-env)

bench-gpu-cpu: install ## the GPU benchmark's proof on this CPU: 3.11 wheelhouse, --quick (~5 min)
	$(BIN)/python -m bench.gpu_pack --python-version 3.11 --provided-from-env --dest .gpu-wheels-311
	PATH=$(CURDIR)/$(BIN):$$PATH GPU_WHEELS=.gpu-wheels-311 BLOCK_TENSORFLOW=1 bash bench/gpu_bench.sh --quick

bench-soak: install ## ten minutes of mixed traffic at 20 requests/s: 5xx, memory growth, p99 per minute, see docs/benchmarks.md
	$(BIN)/python -m bench.soak_bench

compose-config: install ## validate docker-compose.yml (with .env, or the placeholders of .env.example)
	@envf=$$([ -f .env ] && echo .env || echo .env.example); \
	err=$$($(BIN)/docker-compose --env-file $$envf config --quiet 2>&1); [ -z "$$err" ] || { echo "$$err"; exit 1; }; echo "docker-compose.yml is valid"

clean: ## remove the virtual environment and local project data
	rm -rf $(VENV) .imgcls
