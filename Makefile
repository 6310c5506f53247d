# Keyhole: the two commands the README opens with, and their parts.
#   make demo   builds Keyhole and runs its main job end to end on the builtin defaults
#   make test   builds and runs the whole test suite (unit, property, corpus, end-to-end,
#               then a short fuzz run of the engine); the SDK example is built first, since
#               an end-to-end test drives a sandbox with it
SWIFT ?= swift
KEYHOLE = .build/debug/keyhole

FUZZ_SECONDS ?= 60

.PHONY: all deps build examples test unit-test fuzz bench demo clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(SWIFT) build

test: unit-test fuzz

# The Swift SDK's example program (its own package, on this one by path).
examples: deps
	$(SWIFT) build --package-path examples/sandbox-run

unit-test: deps examples
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build

fuzz: deps
	scripts/fuzz.sh $(FUZZ_SECONDS)

bench:
	cd bench && $(SWIFT) package --allow-writing-to-package-directory benchmark --target EngineBenchmarks

demo: build
	@scripts/demo.sh

clean:
	rm -rf .build .keyhole-demo bench/.build fuzz/.build-fuzz examples/sandbox-run/.build
