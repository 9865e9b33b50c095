# Two commands do everything on a fresh Debian machine with Python 3.11 (as root):
#   make study   set up, then run the study's default profile on the CPU
#   make test    set up, then run the whole test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := openclipart-png dataset-fashion-mnist chromium
PROFILE ?= quick

.PHONY: study test bench notebooks setup apt clean-venv

setup: $(VENV)/.installed apt

$(VENV)/.installed: requirements.lock requirements-nodeps.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
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
	$(PY) -m pixelrepa.study --profile $(PROFILE)

# The unit tests, then strict nbval over the notebooks committed with their smoke-profile outputs.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests notebooks --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg

# Re-execute notebooks/ in place with their default (smoke) parameters: what nbval then compares against.
notebooks: setup
	for nb in notebooks/[0-9][0-9]_*.ipynb; do $(PY) -m papermill $$nb $$nb --cwd notebooks -k python3 --no-progress-bar || exit 1; done

bench: setup
	$(PY) -m pixelrepa.bench

clean-venv:
	rm -rf $(VENV)
