# The README's two commands: `make audit` and `make test`. Both create .venv on first
# use and install the pinned CPU-only set (requirements/ci.txt) plus this package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: audit test bench lint clean

$(STAMP): pyproject.toml requirements/ci.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements/ci.txt -e '.[dev]'
	touch $@

audit: $(STAMP)
	$(BIN)/gradcheck audit --json reports/audit.json

test: $(STAMP)
	$(BIN)/ruff check gradcheck tests benchmarks
	$(BIN)/ruff format --check gradcheck tests benchmarks
	$(BIN)/python -m pytest -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
