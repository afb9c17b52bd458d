# Entry points for users, tests and CI. `make test` and `make demo` set everything up themselves.
.PHONY: setup build size test demo bench lint clean deploy repl flash stack stack-down fleet fleet-down fleet-measure soak

PY := .venv/bin/python
LINT_PATHS := lib firmware host_tests tools/iotjobs_host tools/jobsd tools/devsim tools/build tools/size tools/images tools/demo tools/jobs tools/bench tools/sign tools/deploy tools/provision tools/flash tools/stack tools/fleet tools/soak tools/stubcheck boards/esp32
BOARD ?=

setup:
	@tools/setup

build: setup
	@tools/build $(if $(BOARD),--board $(BOARD),)

size: setup
	@tools/build --all-boards
	@tools/size

deploy: setup
	@test -n "$(PORT)" || { echo "make deploy PORT=/dev/ttyUSB0 [BOARD=ESP32_GENERIC] [CONFIG=build/provision/THING]"; exit 2; }
	@tools/deploy --port $(PORT) --board $(or $(BOARD),ESP32_GENERIC) $(if $(CONFIG),--config $(CONFIG),)

repl: setup
	@test -n "$(PORT)" || { echo "make repl PORT=/dev/ttyUSB0"; exit 2; }
	.venv/bin/mpremote connect $(PORT) repl

flash: setup
	@test -n "$(PORT)" -a -n "$(FIRMWARE)" || { echo "make flash PORT=/dev/ttyUSB0 FIRMWARE=image.bin [BOARD=ESP32_GENERIC] [CONFIG=build/provision/THING]"; exit 2; }
	@tools/flash --port $(PORT) --firmware $(FIRMWARE) --board $(or $(BOARD),ESP32_GENERIC) $(if $(CONFIG),--config $(CONFIG),)

# The local stack for real boards (tools/stack): make stack ENDPOINT=192.168.1.20[:8883]
stack: setup
	@tools/stack up $(if $(ENDPOINT),--endpoint $(ENDPOINT),) $(if $(STACK_DIR),--dir $(STACK_DIR),)

stack-down:
	@tools/stack down $(if $(STACK_DIR),--dir $(STACK_DIR),)

# A fleet of simulated devices on this PC (tools/fleet): make fleet DEVICES=50
fleet: setup
	@tools/fleet up --devices $(or $(DEVICES),50) $(if $(FLEET_DIR),--dir $(FLEET_DIR),)

fleet-down:
	@tools/fleet down $(if $(FLEET_DIR),--dir $(FLEET_DIR),)

fleet-measure: setup
	@tools/fleet measure --devices $(or $(DEVICES),50)

# The chaos soak: 50 devices, more than 1,000 seeded faults, the invariants (build/soak.json);
# SEED=n replays another schedule. Then the pinned regression seeds' whole replays.
soak: setup
	@tools/soak scenarios/soak.json --own-fleet $(if $(SEED),--seed $(SEED),) --report build/soak.json
	IOTJOBS_SOAK_LONG=1 $(PY) -m pytest host_tests/test_soak.py -k pinned -q

# Three pytest-xdist workers on two cores (every fixture takes free ports and its own tmp_path;
# much of the suite waits on keepalives and deadlines, not the CPU): 9 minutes, not 11 and a half
# with two. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 3
test: setup
	$(PY) -m pytest host_tests -n $(TEST_WORKERS) $(PYTEST_ARGS)

demo: setup
	@tools/demo

bench: setup
	@tools/bench

lint: setup
	.venv/bin/ruff check $(LINT_PATHS)
	tools/stubcheck

clean:
	rm -rf build .pytest_cache
