# Two commands do everything on a fresh Debian machine with Python 3.11 (as root):
#   make study   set up, then run the study's default profile on the CPU
#   make test    set up, then run the whole test suite (make unit, make nbval, make browser: its parts)
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := openclipart-png dataset-fashion-mnist chromium
PROFILE ?= quick
WORKERS ?= $(shell nproc)  # make study trains its runs in this many processes side by side

.PHONY: study test unit nbval browser bench notebooks setup apt clean-venv

setup: $(VENV)/.installed apt

# pip at -qq: errors only (this machine's pip configuration names package indexes that lack most
# packages, and pip warns about each one it skips); PIP_QUIET=-q shows pip's warnings again.
PIP_QUIET ?= -qq
$(VENV)/.installed: requirements.lock requirements-nodeps.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) -r requirements.lock
	$(PY) -m pip install $(PIP_QUIET) --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .
	touch $@

# Debian packages, installed only when missing: the offline datasets, and chromium for static figures
# (kaleido) and the JupyterLab browser test (playwright drives /usr/bin/chromium; nothing is downloaded).
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "error: missing Debian packages:$$missing; run: sudo apt-get install -y$$missing"; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

study: setup
	$(PY) -m pixelrepa.study --profile $(PROFILE) --workers $(WORKERS)

# Tests write only under a temporary folder: $PIXELREPA_OUTPUT_ROOT takes the study's runs and results
# (study.output_path), where the notebooks nbval executes would otherwise train into runs/ and write
# papermill_runs/smoke/. The folder is removed afterwards, or kept and named when a test fails.
PYTEST = out=$$(mktemp -d -t pixelrepa-test-XXXXXX) && export PIXELREPA_OUTPUT_ROOT=$$out && \
	$(PY) -m pytest -q -p no:cacheprovider
DONE = ; rc=$$?; if [ $$rc = 0 ]; then rm -rf "$$out"; else echo "test outputs kept in $$out"; fi; exit $$rc
NBVAL = notebooks --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg

# Everything: the unit tests, the JupyterLab browser test, then strict nbval over the notebooks
# committed with their smoke-profile outputs.
test: setup
	$(PYTEST) tests $(NBVAL) $(DONE)

# The parts of `make test`: the unit tests (tests/, all but the browser test), the notebooks under
# nbval, and the explorer notebook in JupyterLab driven by headless chromium (tests marked browser).
unit: setup
	$(PYTEST) -m "not browser" tests $(DONE)

nbval: setup
	$(PYTEST) $(NBVAL) $(DONE)

browser: setup
	$(PYTEST) -m browser tests $(DONE)

# Re-execute notebooks/ in place with their default (smoke) parameters: what nbval then compares against.
notebooks: setup
	for nb in notebooks/*.ipynb; do $(PY) -m papermill $$nb $$nb --cwd notebooks -k python3 --no-progress-bar || exit 1; done

# The Performance figures of the README: benchmarks/ (outside the package), run from the repository root.
bench: setup
	$(PY) -m benchmarks.bench

clean-venv:
	rm -rf $(VENV)

# The GPU check (scripts/gpu_check.py): on a GPU machine, with its own python3 and PyTorch (no .venv),
# under 8 minutes on one H200; results in $OUT (or gpu-check-results/). Packages that machine lacks
# travel as wheels in .whl/, which `make gpu-wheels` downloads here (pure Python: torch-fidelity).
GPU_PYTHON ?= python3
GPU_WHEELS := torch-fidelity==0.4.0
.PHONY: gpu-check gpu-wheels
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py --out $${OUT:-gpu-check-results}

gpu-wheels:
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl $(GPU_WHEELS)
