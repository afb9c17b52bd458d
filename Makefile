# Entry points for users, tests and CI. `make test` and `make demo` set everything up themselves.
.PHONY: setup build test test-fast demo bench clean

PY := .venv/bin/python

setup:
	@tools/setup

build: setup
	@tools/build

test: setup
	$(PY) -m pytest host_tests $(PYTEST_ARGS)

demo: setup
	@tools/demo

bench: setup
	@tools/bench

clean:
	rm -rf build .pytest_cache
