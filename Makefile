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

.PHONY: demo test check lint typecheck pytest pytest-extra bench clean

demo: $(STAMP)
	$(VENV)/bin/python examples/bank.py bank.db  # run it twice: the state persists

test: check pytest pytest-extra

check: lint typecheck

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

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

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_core.py
	$(VENV)/bin/python benchmarks/bench_persistence.py
	$(VENV)/bin/python benchmarks/bench_brokers.py
	$(VENV)/bin/python benchmarks/bench_workers.py

$(STAMP): pyproject.toml
	@echo "== Installing pybondi and its dev tools into $(VENV) ($(PYTHON))"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf .venv .venv-3.* .mypy_cache .ruff_cache .pytest_cache
