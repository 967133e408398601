# fedray: `make demo` runs the main job on synthetic smears; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test bench bench-peers gpu-wheels clean

install: $(STAMP)

# pip takes torch 2.14.1 / torchvision 0.29.1 from the local wheel store when one is configured.
# The bytecode is compiled once here, on every core: where PYTHONDONTWRITEBYTECODE is set, no
# import writes it, and each process (every hospital, trial and replica) would compile torch
# from source again, twice the time to import it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile --disable-pip-version-check -e ".[dev]"
	@# (a few files of the libraries' own tests are for newer Pythons and do not compile)
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	$(BIN)/python -m compileall -q fedray
	touch $(STAMP)

demo: install
	$(BIN)/fedray train --config configs/demo.yaml --report

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/federation.py

# The peers the federation benchmark compares with, each in its own environment: Flower's
# simulation engine pins its own Ray. Same torch/torchvision as fedray's environment.
PEERS       ?= .venv-peers
PEERS_STAMP := $(PEERS)/.installed-stamp

$(PEERS_STAMP): benchmarks/peers/requirements.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet --no-compile --disable-pip-version-check \
		-r benchmarks/peers/requirements.txt
	$(PEERS)/bin/python -m compileall -q -j 0 $(PEERS)/lib > /dev/null || true
	touch $(PEERS_STAMP)

bench-peers: install $(PEERS_STAMP)
	$(BIN)/python benchmarks/federation.py --peers $(PEERS)

# The wheels benchmarks/gpu.sh installs on a GPU machine with CUDA torch and no network: what
# fedray's training, DP and serving code needs beyond that machine's image, at this
# environment's versions, for that machine's Python (GPU_PYTHON); Ray without its Java workers.
GPU_PYTHON ?= 3.12
GPU_WHEELS ?= .gpu-wheels

gpu-wheels: install
	$(BIN)/python benchmarks/gpu_wheels.py --output $(GPU_WHEELS) --python $(GPU_PYTHON)

clean:
	rm -rf runs .pytest_cache
