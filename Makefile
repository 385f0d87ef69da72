# fedpeft — one entry point for people and CI.
#   make run     set up, fetch models and data, build, run a small federated trial (the main job)
#   make test    the whole test suite (what CI runs)
#   make bench   benchmarks (figures quoted in README.md)
#   make lint    rustfmt + clippy -D warnings
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= auto

.PHONY: setup run test test-rust check-nostd bench lint fmt models clean

setup:
	@scripts/setup.sh

# The main job: 8 edge-client processes + the aggregator with its embedded broker, training
# LoRA on EfficientNet-Lite0 over Dirichlet-split Fashion-MNIST (trials/quickstart.toml).
TRIAL ?= trials/quickstart.toml
run: setup models
	$(CARGO) build --release --bins -p fedpeft-aggregator -p fedpeft-edge -p fedpeft-fleet
	$${CARGO_TARGET_DIR:-target}/release/fedpeft-fleet run $(TRIAL)

check-nostd:
	$(CARGO) check -p fedpeft-protocol --no-default-features --target thumbv7em-none-eabihf

# The workspace builds the edge client and aggregator with onnxruntime (`ort`, load-dynamic), so
# the backbone's ort tests (parity, tract/ort agreement, library errors) run here too, on the
# library `make models` built unless ORT_DYLIB_PATH names another.
export ORT_DYLIB_PATH ?= $(CURDIR)/models/build/onnxruntime/libonnxruntime.so.1.31.1
test-rust:
	$(CARGO) build --workspace --bins
	@if command -v cargo-nextest >/dev/null; then \
	  $(CARGO) nextest run --workspace --no-fail-fast; \
	else \
	  $(CARGO) test --workspace --no-fail-fast; \
	fi
	$(CARGO) test --workspace --doc

test: setup models check-nostd test-rust

bench:
	$(CARGO) bench -p fedpeft-protocol --bench codec
	$(CARGO) bench -p fedpeft-peft --bench train

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# Backbones (models/build/), onnxruntime's library and the SpamAssassin corpus; idempotent.
models: setup
	@scripts/models/build.sh

clean:
	$(CARGO) clean
