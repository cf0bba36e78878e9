# Two commands do everything on a fresh machine (they create .venv on first use):
#   make main   - the main job
#   make test   - the test suite
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

.PHONY: setup main test lm
setup: $(STAMP)

main: $(STAMP)
	$(VENV)/bin/python -m rl.train --config configs/rl_addition_cpu.toml

lm: $(STAMP)
	$(VENV)/bin/python -m precisionrt.train --config configs/lm_tiny_cpu.toml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
