# Development entry points. Each target builds the local virtual environment it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: bench test lint clean

bench: $(STAMP)
	$(BIN)/logitless bench $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# torch is pinned to 2.13.0 for development (the build is the configured index's: the CPU one on
# this project's machines); the package itself needs only torch>=2.4.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,bench,hf]'
	touch $@

clean:
	rm -rf $(VENV) bench-out .pytest_cache .ruff_cache .hypothesis
