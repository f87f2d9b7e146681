# trieflow — two commands: `make demo` (main job on embedded defaults) and `make test`.
# Each creates .venv if missing and installs the pinned stack first (torch CPU build first).
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(REQ_HASH)
DATA_DIR ?= $(shell [ -d ../shared/data/kgclue ] && echo ../shared/data/kgclue)
OUT ?= runs/demo
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: venv demo data-prep test test-fast ui bench bench-trie clean

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -c constraints.txt -r requirements.txt
	# The project itself (pyproject.toml: the same pins, the `trieflow` command), editable.
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	# Prebuild DeepSpeed's shm comm op once, so no training run JIT-compiles it (~40-90 s, 6 GB).
	DS_BUILD_SHM_COMM=1 $(VPY) -m pip install -q --no-build-isolation --no-cache-dir \
	    --force-reinstall --no-deps -c constraints.txt deepspeed==0.19.8
	rm -f $(VENV)/.installed-*; touch $@

# The main job: the whole kgclue-pipeline DAG, tiny preset, on embedded defaults (local Ray,
# ephemeral Prefect API with its database under .prefect/, which the UI of `make ui` reads).
demo: $(STAMP)
	$(VPY) -m flows.kgclue --preset tiny $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out $(OUT)
	@echo "Prefect UI for this run: 'make ui', then open http://127.0.0.1:4200/runs (flow kgclue-pipeline)"

data-prep: $(STAMP)
	$(VPY) -m flows.data_prep $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out runs/data-prep

# The Prefect UI over the project's runs (127.0.0.1 only; Ctrl-C stops it).
ui: $(STAMP)
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect} PREFECT_SERVER_ANALYTICS_ENABLED=false \
	    $(VENV)/bin/prefect server start --host 127.0.0.1 --port $${PORT:-4200}

test: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider -m "not slow" tests

bench-trie: $(STAMP)
	$(VPY) -m bench.trie --scale full --json bench/results/trie-full.json

# Every benchmark, each measuring its baseline in the same run (README "Performance").
bench: bench-trie $(STAMP)
	$(VPY) -m bench.train_throughput $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --json bench/results/train-throughput.json
	test -f $(OUT)/model/manifest.json || $(MAKE) demo
	$(VPY) -m bench.decode --run $(OUT) --threads 2 --batch 64 --beam 4 --n-questions 512 --repeat 3 --json bench/results/decode.json

clean:
	rm -rf runs .prefect .pytest_cache

# ---- Operations: the local Prefect stack (scripts/local_stack.sh, infra/README.md) ----------
# PORT (4200), PREFECT_HOME (.prefect) and POOL (trieflow-local) pass through the environment.
STACK := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/local_stack.sh
.PHONY: stack-up stack-down stack-status deploy ui-screenshot

stack-up: $(STAMP)
	$(STACK) up

stack-down:
	$(STACK) down

stack-status:
	$(STACK) status

deploy: $(STAMP)
	$(STACK) deploy

# Headless-Chromium screenshot of a flow run's page in the Prefect UI -> runs/ui/flow-run.png.
# Brings the stack up (left running: `make stack-down`); runs data-prep/sample if no run exists.
# Needs the Debian `chromium` package; not part of `make test` / CI.
ui-screenshot: stack-up
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VPY) scripts/ui_screenshot.py --out runs/ui/flow-run.png
