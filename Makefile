# Two commands on a fresh machine with Python 3.11+:  make run  |  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint unit clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

## make run: install, migrate the embedded SQLite database, serve on loopback with demo data
run: $(STAMP)
	$(BIN)/cardcore migrate
	$(BIN)/cardcore serve --demo

## make lint: ruff and mypy --strict
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

## make test: lint, then every test on SQLite and PostgreSQL (CARDCORE_TEST_PG_URL): the
## suite in TEST_WORKERS processes, then the fault tests (timing under load) on their own
TEST_WORKERS ?= 4
test: lint
	$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) -m "not fault"
	$(BIN)/pytest -q -p no:cacheprovider -m fault

## make unit: the pure unit tests only (fast)
unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

## make clean: the virtualenv and the tools' caches; never data/ (the embedded database, its
## key-encrypting key and the store-and-forward file: remove that folder by hand, on purpose)
clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
