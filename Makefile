# The README's two commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv
venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: venv
	$(PY) -u demo.py

# One test process per core (pytest-xdist), a test module's tests kept together so its shared fixtures are built
# once, each process on one thread so the processes do not oversubscribe the cores.
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadscope --durations=10 tests
