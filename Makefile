# The front door. Every target depends on `setup`, so on a fresh machine `make demo` and
# `make test` are the only two commands a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on this project's build machines; elsewhere pip takes the
# default (CUDA on Linux) build of the same release. Override with TORCH_SPEC=... if needed.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

CORPUS_DIR ?= sample-corpus
CORPUS_PORT ?= 8765
INPUT ?= $(CORPUS_DIR)/corpus.parquet
# OUTPUT is each target's own output: shards for `make shards`, the ControlNet run for `make train`.
OUTPUT ?=
ENGINE_ARGS ?=
SHARDS ?=
MODEL ?= runwayml/stable-diffusion-v1-5
TRAIN_OUTPUT ?= $(or $(OUTPUT),controlnet-out)
TRAIN_ARGS ?=
DEMO_OUT ?= demo-out
# make train's default output (in `make generate`, OUTPUT= is the folder of PNGs)
CONTROLNET ?= controlnet-out
IMAGE ?=
PROMPT ?= a photo
GENERATE_ARGS ?=
PYTEST_ARGS ?=
# e.g. ENGINE_BENCH_ARGS='--photos ~/Pictures' (your own photos instead of the laion profile), '--server files'
ENGINE_BENCH_ARGS ?=

.PHONY: help setup system-deps lint test test-quick demo corpus corpus-stop shards precompute train generate bench bench-engine bench-remap bench-dedup bench-dedup-cost bench-scaling bench-train clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

setup: $(STAMP)  ## create .venv and install everything (system libraries too, where root)

system-deps:  ## libturbojpeg (engine) and ImageMagick (tests, bench) from the system's packages
	@bash scripts/system-deps.sh

$(STAMP): pyproject.toml scripts/system-deps.sh
	@$(MAKE) --no-print-directory system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@# Numba compiles the engine's kernels into engine/__pycache__ here, once (~7 s), not in the first run
	$(PY) -c "import engine.forkwarm" || echo "(not compiled now: the first run compiles them)"
	touch $(STAMP)

lint: setup  ## ruff
	$(VENV)/bin/ruff check engine trainer bench tests

test: setup  ## everything CI runs
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-quick: setup  ## the fast unit tests only
	$(PY) -m pytest tests -m quick $(PYTEST_ARGS)

demo: setup  ## the whole path offline: loopback image server -> shards -> short CPU training of a tiny model -> generate
	$(PY) -m bench.demo --output $(DEMO_OUT)

corpus: setup  ## build the sample corpus and serve it on 127.0.0.1:$(CORPUS_PORT) in the background
	$(PY) -m bench.corpus build --out $(CORPUS_DIR) --port $(CORPUS_PORT)
	@$(MAKE) --no-print-directory corpus-stop >/dev/null 2>&1 || true
	nohup $(PY) -m bench.corpus serve --dir $(CORPUS_DIR) --port $(CORPUS_PORT) >$(CORPUS_DIR)/server.log 2>&1 & echo $$! >$(CORPUS_DIR)/server.pid
	@sleep 2; echo "serving $(CORPUS_DIR) on http://127.0.0.1:$(CORPUS_PORT) (make corpus-stop ends it); now: make shards"

corpus-stop:  ## stop the sample corpus server
	@test -f $(CORPUS_DIR)/server.pid && kill $$(cat $(CORPUS_DIR)/server.pid) && rm -f $(CORPUS_DIR)/server.pid || true

# The sample corpus is served on loopback, which the engine fetches only when told (docs/SECURITY.md);
# any other INPUT keeps the default: public addresses only.
SHARDS_NET = $(if $(filter $(CORPUS_DIR)/corpus.parquet,$(INPUT)),--allow-private-network)

shards: setup  ## make shards INPUT=laion.parquet OUTPUT=shards/ [ENGINE_ARGS='--workers 16'] (default INPUT: the sample corpus)
	$(PY) -m engine shards $(INPUT) --output $(or $(OUTPUT),shards) $(SHARDS_NET) $(ENGINE_ARGS)

precompute: setup  ## make precompute SHARDS='shards/{00000..00063}.tar' MODEL=... OUTPUT=pre/ (VAE latents + text embeddings once; GPU)
	@test -n "$(SHARDS)" -a -n "$(OUTPUT)" || { echo "give SHARDS=, MODEL= and OUTPUT=, e.g. make precompute SHARDS='shards/{00000..00003}.tar' MODEL=... OUTPUT=pre/"; exit 2; }
	$(PY) -m trainer precompute --shards '$(SHARDS)' --model $(MODEL) --output $(OUTPUT)

train: setup  ## make train SHARDS='shards/{00000..00063}.tar' MODEL=... OUTPUT=... [TRAIN_ARGS=...]
	@test -n "$(SHARDS)" || { echo "give SHARDS=, e.g. make train SHARDS='shards/{00000..00003}.tar' MODEL=... OUTPUT=run/"; exit 2; }
	$(PY) -m trainer --shards '$(SHARDS)' --model $(MODEL) --output $(TRAIN_OUTPUT) $(TRAIN_ARGS)

generate: setup  ## make generate IMAGE=photo.jpg PROMPT='a house' [CONTROLNET=controlnet-out MODEL=... OUTPUT=generated GENERATE_ARGS=...]
	@test -n "$(IMAGE)" || { echo "give IMAGE=, e.g. make generate IMAGE=photo.jpg PROMPT='a house at dusk' CONTROLNET=controlnet-out"; exit 2; }
	$(PY) -m trainer generate --controlnet $(CONTROLNET) --model $(MODEL) --image '$(IMAGE)' --prompt '$(PROMPT)' --output $(or $(OUTPUT),generated) $(GENERATE_ARGS)

bench: bench-remap bench-engine bench-dedup bench-dedup-cost  ## CPU benchmarks against the peers; figures go to bench/RESULTS.md

bench-engine: setup  ## engine vs img2dataset on the loopback corpus (nginx when installed), alternating (~7 min; first run +2.5 min corpus)
	$(PY) -m bench.engine_bench $(ENGINE_BENCH_ARGS)

bench-remap: setup  ## Numba palette remap vs numpy vs ImageMagick
	$(PY) -m bench.remap_bench

bench-dedup: setup  ## near-duplicate detection quality and index throughput
	$(PY) -m bench.dedup_bench

bench-scaling: setup  ## the engine's images/s at 1..16 workers on local files (a 16-core machine)
	$(PY) -m bench.scaling --save

bench-dedup-cost: setup  ## the engine's images/s with dedup on and off
	$(PY) -m bench.dedup_cost

bench-train: setup  ## GPU: ours vs diffusers train_controlnet.py, full SD 1.5 architecture, fp16 + 8-bit AdamW (needs CUDA + the peer script)
	$(PY) -m bench.train_bench

clean:  ## remove outputs (keeps .venv)
	rm -rf $(DEMO_OUT) .pytest_cache bench/.work
