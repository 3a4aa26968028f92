# The two commands of the README: `make run` and `make test`.
# Both set up everything they need on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
TESTENV_CACHE ?= $(or $(CA_DAEMON_TESTENV),$(HOME)/.cache/ca-daemon-testenv)

.PHONY: run test lint testenv venv clean

$(BIN)/ca-daemon: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/ca-daemon

run: venv
	$(BIN)/ca-daemon run $(ARGS)

lint: venv
	$(BIN)/ruff check ca_daemon tests bench
	$(BIN)/ruff format --check ca_daemon tests bench
	$(BIN)/mypy

testenv: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/testenv

test: lint testenv
	PATH="$(TESTENV_CACHE)/bin:$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
