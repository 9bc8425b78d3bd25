# ferrotune — every install and build step lives here, so a cold machine needs only `make demo` / `make test`.
SHELL := /bin/bash
FERROTUNE_CACHE ?= $(HOME)/.cache/ferrotune
export FERROTUNE_CACHE
VENV := $(FERROTUNE_CACHE)/venv
# tch's build script asks this venv's python where libtorch is (LIBTORCH_USE_PYTORCH).
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(HOME)/.cargo/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
# One target dir outside the clone, shared by every checkout: a cold machine builds it, a warm one reuses it.
export CARGO_TARGET_DIR ?= $(FERROTUNE_CACHE)/target
CARGO ?= cargo
BIN := target/release/ferrotune

.PHONY: target-link all libtorch tracking-venv test-tools bench-dist bench-long build build-cuda test test-learning lint demo bench bench-train bench-rollout bench-score bench-colocate fixtures clean-cache

all: build

libtorch: $(VENV)/.torch-ok
$(VENV)/.torch-ok: scripts/libtorch.sh
	bash scripts/libtorch.sh >/dev/null
	touch $@

# MLflow and TensorBoard for the tracking tests (a real `mlflow server`, TensorBoard's event reader).
TRACKING_VENV := $(FERROTUNE_CACHE)/tracking-venv
export FERROTUNE_TRACKING_VENV := $(TRACKING_VENV)
tracking-venv: $(TRACKING_VENV)/.ok
$(TRACKING_VENV)/.ok: scripts/tracking-venv.sh
	bash scripts/tracking-venv.sh >/dev/null
	touch $@

# Debian programs the tests drive (promtool, headless Chromium + ChromeDriver).
test-tools:
	bash scripts/test-tools.sh

# The link `target` -> $(CARGO_TARGET_DIR) makes `target/release/ferrotune` exist in the clone.
target-link:
	@if [ "$(CARGO_TARGET_DIR)" != "$(CURDIR)/target" ] && [ ! -d target -o -L target ]; then ln -sfn "$(CARGO_TARGET_DIR)" target; fi

build: libtorch target-link
	$(CARGO) build --release --locked -p ferrotune-cli

# For a GPU host: links libtorch_cuda so that cuda:N devices are usable.
build-cuda: libtorch target-link
	FERROTUNE_CUDA=1 $(CARGO) build --release --locked -p ferrotune-cli

# Tests run in the release profile so they share every compiled dependency with `make build`.
# One libtorch thread per process: the harness runs tests side by side (and the end-to-end tests start several
# processes each), and OpenMP threads spinning on cores another process holds made two concurrent SmolLM2
# trainings 2.4x slower than with one thread each (30.4 s vs 12.5 s for 2 x 8 steps on 2 cores).
# The fast tier: unit, tiny-fixture integration, end-to-end plumbing and SmolLM2 parity (the learning proofs
# are #[ignore]d here and run by test-learning).
test: build tracking-venv test-tools
	@start=$$(date +%s); \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(CARGO) test --release --locked --workspace --no-fail-fast; rc=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s (exit $$rc)"; exit $$rc

# The learning tier: every learning proof on SmolLM2 (the e2e tests marked "learning proof").
test-learning: build
	@start=$$(date +%s); \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(CARGO) test --release --locked -p ferrotune-tests --test e2e --no-fail-fast -- --ignored; rc=$$?; \
	echo "make test-learning: $$(( $$(date +%s) - start )) s (exit $$rc)"; exit $$rc

# Format and lint gates of CI.
lint: libtorch target-link
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings
	bash scripts/check-k8s.sh

demo: build
	bash scripts/demo.sh

# Generation throughput vs HF transformers (HF side only where a dev Python with transformers exists).
bench: libtorch target-link
	$(CARGO) bench --locked -p ferrotune-core --bench generation

# Training throughput and peak RSS vs HF PEFT (HF side only where a dev Python with peft exists).
bench-train: libtorch target-link
	$(CARGO) bench --locked -p ferrotune-core --bench training

# Peak memory and tokens/s at 1k / 2k / 4k tokens per row, with and without checkpointing, beside PEFT.
bench-long: libtorch target-link
	FERROTUNE_BENCH_LONG=1 FERROTUNE_BENCH_REPEATS=$${FERROTUNE_BENCH_REPEATS:-1} FERROTUNE_BENCH_STEPS=$${FERROTUNE_BENCH_STEPS:-1} $(CARGO) bench --locked -p ferrotune-core --bench training

# Group rollouts (8 prompts × 8 samples) vs HF generate(num_return_sequences=8), and QLoRA vs LoRA sessions.
bench-rollout: libtorch target-link
	$(CARGO) bench --locked -p ferrotune-core --bench rollout

# Reward scoring over gRPC: throughput and p50/p99 latency at 1, 8, 32 clients, dynamic batching off and on.
bench-score: libtorch target-link
	$(CARGO) bench --locked -p ferrotune-reward --bench scoring

# Two trainings side by side vs each alone, under each CPU setting (OpenMP wait policy, threads).
bench-colocate: build
	$(CARGO) bench --locked -p ferrotune-tests --bench colocate

# Dev only: regenerates the tiny-model fixtures with HF transformers (see tests/fixtures/README.md).
fixtures:
	"$$(bash scripts/dev-python.sh)" tests/fixtures/make_tiny.py tests/fixtures/tiny
	"$$(bash scripts/dev-python.sh)" tests/fixtures/make_tiny_lora.py tests/fixtures

clean-cache:
	rm -rf "$(FERROTUNE_CACHE)/target"

# Data-parallel overhead: 1 vs 2 ranks of LoRA SFT (scripts/bench_dist.sh).
bench-dist: build
	bash scripts/bench_dist.sh
