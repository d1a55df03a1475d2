# The two commands of the README. Each creates .venv (from requirements.txt) on first use.
#   make test   library tests, notebook pairing/output checks, nbval on every chapter
#   make book   the strict Jupyter Book build from an empty _build into _build/html
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Small CNFs run many times faster with one torch thread on a busy CPU (see the Performance
# appendix); the notebooks and tests inherit this. Never force a non-interactive matplotlib backend here: executed
# notebooks would lose their figures.
export OMP_NUM_THREADS := 1
export PYTHONHASHSEED := 0

.PHONY: test book venv lint clean benchmarks

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check cnf_lib tests benchmarks tools

test: $(STAMP) lint
	$(BIN)/python -m pytest tests
	rm -rf .glue/nbval
	CNF_LIB_GLUE_LOG=$(CURDIR)/.glue/nbval $(BIN)/python -m pytest --nbval-lax --nbval-current-env \
		--nbval-cell-timeout=900 -p no:cacheprovider book/

book: $(STAMP)
	rm -rf _build .glue/book
	CNF_LIB_GLUE_LOG=$(CURDIR)/.glue/book $(BIN)/jupyter-book build . --all -W -n --keep-going
	@test -f _build/html/index.html && echo "book written to _build/html/index.html"
	# the built pages load nothing from another host (MathJax and every script are local)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_book_offline.py
	# same seeds, same numbers: the build's glued values must equal nbval's (when make test ran first)
	$(BIN)/python tools/compare_glue.py .glue/nbval .glue/book

benchmarks: $(STAMP)
	$(BIN)/python -m pip install --quiet -r benchmarks/requirements.txt
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf _build .pytest_cache
