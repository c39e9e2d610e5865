# Two entry points (see README): `make demo` and `make test`. Both build the virtualenv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?=
DATASET ?=
PYTEST_ARGS ?=

.PHONY: demo test venv clean

venv: $(STAMP)

# Reinstall whenever the declared dependencies or the lock of tested versions change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo $(if $(DATA),--source $(DATA)) $(if $(DATASET),--dataset $(DATASET))

# pytest exits 5 when it collected nothing; make then fails, so an empty suite never passes.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
