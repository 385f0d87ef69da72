# fedpeft — one entry point for people and CI.
#   make run     set up, fetch models and data, build, run a small federated trial (the main job)
#   make test    the whole test suite (what CI runs)
#   make bench   benchmarks (figures on the book's results pages, docs/src/results/)
#   make book    the book (docs/ -> docs/book/)
#   make lint    rustfmt + clippy -D warnings
#   make cross-aarch64 | cross-armv7 | cross-jetson   board bundles in dist/ (book: guide/device.md)
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= auto

.PHONY: setup run test test-rust check-nostd book bench lint fmt models clean \
	cross-aarch64 cross-armv7 cross-jetson bundle-all test-cross test-cross-ort

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

# The book (docs/): guide, reference, design, results. Written to docs/book/ (git-ignored); a page
# SUMMARY.md names that does not exist fails the build. tests/tests/book.rs checks its reference
# pages against the shipped files and the parsers.
# mdbook as scripts/setup.sh installs it: on PATH, or where cargo install puts it.
MDBOOK ?= $(or $(shell command -v mdbook 2>/dev/null),$(or $(CARGO_HOME),$(HOME)/.cargo)/bin/mdbook)
book: setup
	$(MDBOOK) build docs

test: setup book models check-nostd test-rust test-cross

bench:
	$(CARGO) bench -p fedpeft-protocol --bench codec
	$(CARGO) bench -p fedpeft-peft --bench train

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# On the device: the edge client cross-built for the boards, packed with its model, config,
# systemd unit and install script into dist/fedpeft-edge-BOARD.tar.gz ([profile.edge]). Each
# target installs its own linker, C library, qemu and Rust target (scripts/cross/setup.sh).
#   cross-aarch64  Raspberry Pi 4/5, 64-bit OS: tract + onnxruntime (aarch64 library bundled)
#   cross-armv7    Raspberry Pi 2/3/Zero 2 W, 32-bit OS: tract only
#   cross-jetson   Jetson (JetPack): onnxruntime with CUDA + TensorRT (JetPack's library)
cross-aarch64 cross-jetson: models
	scripts/cross/setup.sh aarch64-unknown-linux-gnu
	scripts/cross/bundle.sh $(patsubst cross-%,%,$@)
cross-armv7: models
	scripts/cross/setup.sh armv7-unknown-linux-gnueabihf
	scripts/cross/bundle.sh armv7
bundle-all: cross-aarch64 cross-armv7 cross-jetson

# The edge client on aarch64 and armv7 under qemu user-mode ([profile.cross-test]): its unit
# tests, one round of each board's binary on the real EfficientNet-Lite0 trunk against the host's
# aggregator and embedded broker (tests/tests/board.rs), each bundle's install + systemd unit
# check. Part of `make test`, after the host tests (it reuses the host build): 20 min cold on
# an idle 2-core machine (book: guide/emulation.md).
test-cross: models
	scripts/cross/test.sh

# onnxruntime on aarch64 under qemu: the backbone's ort trunk tests (parity with PyTorch, tract
# agreement) with the PyPI aarch64 library, /proc/cpuinfo replaced as cross/qemu-run explains.
test-cross-ort: models
	scripts/cross/test-ort.sh

# Backbones (models/build/), onnxruntime's library and the SpamAssassin corpus; idempotent.
models: setup
	@scripts/models/build.sh

clean:
	$(CARGO) clean
