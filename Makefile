# Keyhole: the two commands the README opens with, and their parts.
#   make demo   builds Keyhole and runs its main job end to end on the builtin defaults
#   make test   builds and runs the whole test suite
SWIFT ?= swift
KEYHOLE = .build/debug/keyhole

.PHONY: all deps build test demo clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(SWIFT) build

test: deps
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build

demo: build
	@scripts/demo.sh

clean:
	rm -rf .build .keyhole-demo
