# Two entry points (see README): `make demo` and `make test`. Both build the virtualenv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?=
DATASET ?=
PYTEST_ARGS ?=

.PHONY: demo demo-local test test-unit venv clean

venv: $(STAMP)

# Reinstall whenever the declared dependencies or the lock of tested versions change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The main job on embedded defaults: shards of the bundled digits (or DATA=<dir> of DATASET=<name>), Ray Train on
# 2 local workers, a local MLflow store, the model registered. `make demo-local` is the in-process model demo.
DEMO_DATASET = $(if $(DATASET),$(DATASET),$(if $(DATA),$(notdir $(patsubst %/,%,$(DATA))),digits))
# Episodes of one class for the bundled digits (labelled); i.i.d. episodes for a dataset directory (binarized
# MNIST has no labels). EPISODES=class|random overrides.
EPISODES ?= $(if $(DATA),random,class)
demo: $(STAMP)
	$(PY) -m jobs.prepare --dataset $(DEMO_DATASET) $(if $(DATA),--source $(DATA)) --out outputs/shards/$(DEMO_DATASET) --episode-length 8 --no-progress
	$(PY) -m jobs.train --config jobs/configs/local.yaml data.dataset=$(DEMO_DATASET) data.shards=outputs/shards/$(DEMO_DATASET) data.episodes=$(EPISODES) $(if $(DATA),name=kpp-$(DEMO_DATASET))

demo-local: $(STAMP)
	$(PY) -m jobs.demo $(if $(DATA),--source $(DATA)) $(if $(DATASET),--dataset $(DATASET))

# pytest exits 5 when it collected nothing; make then fails, so an empty suite never passes.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The part that needs no service and trains nothing for minutes (tests/conftest.py marks the rest): a few
# minutes while working; `make test` stays the full suite CI runs.
test-unit: $(STAMP)
	$(PY) -m pytest -m "not services and not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
