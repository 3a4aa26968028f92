# The two commands of the README: `make run` and `make test`.
# Both set up everything they need on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
TESTENV_CACHE ?= $(or $(CA_DAEMON_TESTENV),$(HOME)/.cache/ca-daemon-testenv)

.PHONY: run test lint testenv venv clean bench demo prove

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

# The stateful property suite's long profile: random paths, CA_DAEMON_PROVE_EXAMPLES of
# them (3000 by default, 1.5-2 s each on 2 cores); `make test` runs a bounded, fixed set.
# Failing examples are kept in .hypothesis/ (not committed) and tried first next time.
prove: venv
	$(BIN)/pytest -s -p no:cacheprovider --timeout=0 --hypothesis-profile=prove \
		--hypothesis-show-statistics tests/rotation/test_rotation_stateful.py -k every_path

# Every bench script, then bench/README.md and bench/scaling.png. BENCH_5000=1 adds
# 5,000 clients to the bulk benches (long); the steady-state ones (daemon, steady) run
# 500 and 5,000, and BENCH_10000=1 adds 10,000. BENCH_SIZES=10,100 and BENCH_REPEAT=1
# make it quick.
bench: testenv
	PATH="$(TESTENV_CACHE)/bin:$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.issuance
	PATH="$(TESTENV_CACHE)/bin:$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.rotation
	PATH="$(TESTENV_CACHE)/bin:$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.root
	PATH="$(TESTENV_CACHE)/bin:$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.daemon
	PATH="$(TESTENV_CACHE)/bin:$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.steady
	$(BIN)/python -m bench.report

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# A whole root rotation in about two minutes, with short demo timings (scripts/demo).
demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/demo
