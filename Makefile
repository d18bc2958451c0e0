# whisperd developer and demo commands. On a fresh Debian/Ubuntu machine:
#   make run    set everything up, then run whisperd on ./demo (drop files into demo/inbox)
#   make test   set everything up, then run the test suite
# torch: PyPI's CUDA build by default; without a GPU:  make run TORCH_INDEX=https://download.pytorch.org/whl/cpu

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_CONFIG ?= demo/config.yaml
PYTEST_ARGS ?=

BIN := $(VENV)/bin
# util-linux (prlimit, ionice) and coreutils (nice) run ffmpeg under limits; both are essential on Debian.
RUN_PACKAGES  := ffmpeg python3-venv util-linux
# systemd and procps: the tests verify the unit files with systemd-analyze (ExecReload uses /bin/kill);
# strace: the hostile-input corpus traces the daemon's system calls; chromium: the status page's test
# loads it in a headless browser.
TEST_PACKAGES := $(RUN_PACKAGES) espeak-ng sox systemd procps strace chromium

.PHONY: setup setup-test run test lint clean

# torch goes in first, from one variable, so each machine picks its build: PyPI's torch (the
# default) is the CUDA build, several GB of nvidia wheels, right for a GPU server; a CPU-only
# machine takes TORCH_INDEX=https://download.pytorch.org/whl/cpu.
$(BIN)/.torch: | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BIN)/.installed: pyproject.toml $(BIN)/.torch
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.installed-test: pyproject.toml $(BIN)/.torch
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(BIN)/.installed

setup:
	bash tools/system-deps.sh $(RUN_PACKAGES)
	$(MAKE) --no-print-directory $(BIN)/.installed

setup-test:
	bash tools/system-deps.sh $(TEST_PACKAGES)
	$(MAKE) --no-print-directory $(BIN)/.installed-test

demo/config.yaml:
	mkdir -p demo/inbox demo/outbox demo/archive demo/failed
	cp tools/demo-config.yaml $@

run: setup $(DEMO_CONFIG)
	$(BIN)/whisperd check-config $(DEMO_CONFIG)
	$(BIN)/whisperd run --config $(DEMO_CONFIG)

test: setup-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup-test
	$(BIN)/ruff check daemon tests tools bench
	$(BIN)/mypy daemon

clean:
	rm -rf $(VENV) demo .pytest_cache
