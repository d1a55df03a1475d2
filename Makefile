# The two commands of the README. Each creates .venv (from requirements.txt) on first use.
#   make test   lint, library tests, notebook pairing/output checks, then every chapter executed once
#               (its hidden asserts checked, like nbval --nbval-lax) into the book's execution cache
#   make book   the strict Jupyter Book build into _build/html, rendering the chapters make test
#               executed (or executing them first when it has not run, or cnf_lib changed since)
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

CACHE := _build/.jupyter_cache
EXECUTED := $(CACHE)/executed-by-make-test

.PHONY: test book venv lint clean benchmarks chapters reproduce

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
	$(MAKE) chapters

# every chapter once, two at a time, in a fresh kernel; a failing cell (a hidden assert) fails it
chapters: $(STAMP)
	rm -rf $(CACHE) .glue/tested
	CNF_LIB_GLUE_LOG=$(CURDIR)/.glue/tested $(BIN)/python tools/execute_chapters.py --jobs 2 --cache $(CACHE)

book: $(STAMP)
	@# outputs executed before the last change to the library (or its requirements) are not rendered
	@if [ -f $(EXECUTED) ] && [ -z "$$(find cnf_lib/*.py requirements.txt pyproject.toml -newer $(EXECUTED) -print -quit)" ]; \
		then echo "make book: rendering the chapters make test executed ($(CACHE))"; \
		else $(MAKE) chapters; fi
	mkdir -p _build && find _build -mindepth 1 -maxdepth 1 ! -name .jupyter_cache -exec rm -rf {} +
	$(BIN)/jupyter-book build . --all -W -n --keep-going
	@test -f _build/html/index.html && echo "book written to _build/html/index.html"
	# the built pages load nothing from another host (MathJax and every script are local)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_book_offline.py

# same seeds, same numbers: execute every chapter a second time and compare each glued value with
# make test's run (tools/compare_glue.py; values glued with varies=True, such as timings, excepted)
reproduce: $(STAMP)
	test -f .glue/tested/glue.jsonl || $(MAKE) chapters
	rm -rf .glue/again /tmp/scnormflows-reproduce-cache
	CNF_LIB_GLUE_LOG=$(CURDIR)/.glue/again $(BIN)/python tools/execute_chapters.py --jobs 2 \
		--cache /tmp/scnormflows-reproduce-cache
	$(BIN)/python tools/compare_glue.py .glue/tested .glue/again

benchmarks: $(STAMP)
	$(BIN)/python -m pip install --quiet -r benchmarks/requirements.txt
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf _build .pytest_cache
