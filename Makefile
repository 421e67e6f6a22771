# The two commands a newcomer needs: `make demo` and `make test`. Both create their own
# virtualenvs (Python 3.11 as .venv; 3.12 and 3.13 as .venv-3.12/.venv-3.13 when found).

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

# Extra interpreters for the test suite: pyenv builds first, then PATH; a candidate counts
# only if it runs (a pyenv shim for a version that is not selected does not). They run
# every test but the `stress` ones (many threads and processes against the database
# servers, minutes long), which test the servers and pybondi's SQL, not the interpreter,
# and run once, on the main Python.
EXTRA_PYTHONS := 3.12 3.13

# The core's own tests also run where only pybondi and pytest are installed, as a user of
# the core alone has it: test modules that need an extra are left out there (see
# tests/conftest.py), and everything else must pass.
CORE_VENV := .venv-core
CORE_STAMP := $(CORE_VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

# The peer benchmarks run other libraries beside pybondi: eventsourcing's projection
# runner (bench_projections.py), FastStream's subscribers with a psycopg pool
# (bench_consumers.py). They get one venv of their own, so that neither is ever a
# dependency of pybondi's.
BENCH_VENV := .venv-bench
BENCH_PACKAGES := '.[sqlite,postgres,redis,rabbitmq,nats]' 'eventsourcing[postgres]>=9.5' \
	'faststream[redis,rabbit,nats]==0.7.8' 'psycopg[binary,pool]'
# A new list of packages makes a new venv, as a new pyproject.toml does.
BENCH_STAMP := $(BENCH_VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)-$(shell \
	echo "$(BENCH_PACKAGES)" | cksum | cut -d' ' -f1)

.PHONY: demo test check lint typecheck pytest pytest-core pytest-extra bench clean

demo: $(STAMP)
	$(VENV)/bin/python examples/bank.py bank.db  # run it twice: the state persists

test: check pytest pytest-core pytest-extra

check: lint typecheck

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

pytest-core: $(CORE_STAMP)
	$(CORE_VENV)/bin/python -m pytest -m 'not stress' -p no:cacheprovider

$(CORE_STAMP): pyproject.toml
	@echo "== Installing pybondi alone, and pytest, into $(CORE_VENV) ($(PYTHON))"
	rm -rf $(CORE_VENV)
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CORE_VENV)/bin/python -m pip install --quiet -e . 'pytest>=8'
	touch $@

pytest-extra:
	@for version in $(EXTRA_PYTHONS); do \
		python=""; \
		for candidate in $(HOME)/.pyenv/versions/$$version.*/bin/python$$version \
				$$(command -v python$$version); do \
			if "$$candidate" -c "" 2>/dev/null; then python="$$candidate"; break; fi; \
		done; \
		if [ -z "$$python" ]; then echo "== Python $$version not found: skipped"; continue; fi; \
		echo "== Python $$version: $$python"; \
		$(MAKE) --no-print-directory VENV=.venv-$$version PYTHON=$$python \
			PYTEST_ARGS="-m 'not stress'" pytest || exit 1; \
	done

bench: $(STAMP) $(BENCH_STAMP)
	$(VENV)/bin/python benchmarks/bench_core.py
	$(VENV)/bin/python benchmarks/bench_persistence.py
	$(BENCH_VENV)/bin/python benchmarks/bench_eventsourcing.py
	$(VENV)/bin/python benchmarks/bench_brokers.py
	$(VENV)/bin/python benchmarks/bench_workers.py
	$(BENCH_VENV)/bin/python benchmarks/bench_projections.py
	$(BENCH_VENV)/bin/python benchmarks/bench_consumers.py

# pybondi 1.2.1, the release this project replaces, for bench_core.py's W5L: the same
# import name as pybondi's, so a venv of its own. 1.2.1 requires Python >= 3.12 (its
# metadata says `>=3.12,<4.0`) and fast-depends < 3: pyenv's 3.12 first, then PATH.
BENCH_121_VENV := .venv-bench-121
BENCH_121_STAMP := $(BENCH_121_VENV)/.installed-pybondi-1.2.1

# bench_core.py finds this venv by its path; without it, W5L runs without its peer.
bench: $(BENCH_121_STAMP)

$(BENCH_121_STAMP):
	@echo "== Installing pybondi 1.2.1, for bench_core.py's W5L, into $(BENCH_121_VENV)"
	rm -rf $(BENCH_121_VENV)
	python=""; \
	for candidate in $(HOME)/.pyenv/versions/3.12.*/bin/python3.12 $$(command -v python3.12); do \
		if "$$candidate" -c "" 2>/dev/null; then python="$$candidate"; break; fi; \
	done; \
	if [ -z "$$python" ]; then echo "Python 3.12 not found: pybondi 1.2.1 needs it"; exit 1; fi; \
	"$$python" -m venv $(BENCH_121_VENV)
	$(BENCH_121_VENV)/bin/python -m pip install --quiet 'pybondi==1.2.1'
	touch $@

$(BENCH_STAMP): pyproject.toml
	@echo "== Installing pybondi, eventsourcing and FastStream, for the peer benchmarks, into $(BENCH_VENV)"
	rm -rf $(BENCH_VENV)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -e $(BENCH_PACKAGES)
	touch $@

$(STAMP): pyproject.toml
	@echo "== Installing pybondi and its dev tools into $(VENV) ($(PYTHON))"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf .venv .venv-3.* .venv-core .venv-bench .venv-bench-121 .mypy_cache .ruff_cache .pytest_cache
