# fedray: `make demo` runs the main job on synthetic smears; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test bench clean

install: $(STAMP)

# pip takes torch 2.14.1 / torchvision 0.29.1 from the local wheel store when one is configured.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/fedray train --config configs/demo.yaml --report

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/federation.py

clean:
	rm -rf runs .pytest_cache
