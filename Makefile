# The two commands a newcomer needs: `make demo` and `make test`. Both create their own
# virtualenvs (Python 3.11 as .venv; 3.12 and 3.13 as .venv-3.12/.venv-3.13 when found).

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

# Extra interpreters to run the test suite on: from PATH, else from pyenv.
find_python = $(firstword $(shell command -v python$(1) 2>/dev/null) \
	$(wildcard $(HOME)/.pyenv/versions/$(1).*/bin/python$(1)))
EXTRA_PYTHONS := 3.12 3.13

.PHONY: demo test check lint typecheck pytest pytest-extra bench clean

demo: $(STAMP)
	$(VENV)/bin/python examples/bank.py

test: check pytest pytest-extra

check: lint typecheck

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(VENV)/bin/python -m pytest

pytest-extra:
	@for version in $(EXTRA_PYTHONS); do \
		case $$version in \
			3.12) python="$(call find_python,3.12)";; \
			3.13) python="$(call find_python,3.13)";; \
		esac; \
		if [ -z "$$python" ]; then echo "== Python $$version not found: skipped"; continue; fi; \
		$(MAKE) --no-print-directory VENV=.venv-$$version PYTHON=$$python pytest || exit 1; \
	done

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_core.py

$(STAMP): pyproject.toml
	@echo "== Installing pybondi and its dev tools into $(VENV) ($(PYTHON))"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf .venv .venv-3.* .mypy_cache .ruff_cache .pytest_cache
