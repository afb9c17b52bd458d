# Entry points for users, tests and CI. `make test` and `make demo` set everything up themselves.
.PHONY: setup build test demo bench lint clean

PY := .venv/bin/python
LINT_PATHS := lib firmware host_tests tools/iotjobs_host tools/jobsd tools/devsim tools/build tools/demo tools/jobs tools/bench tools/sign

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

lint: setup
	.venv/bin/ruff check $(LINT_PATHS)

clean:
	rm -rf build .pytest_cache
