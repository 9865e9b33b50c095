# Two commands do everything on a fresh Debian machine with Python 3.11 (as root):
#   make study   set up, then run the study's default profile on the CPU
#   make test    set up, then run the whole test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := openclipart-png dataset-fashion-mnist
PROFILE ?= quick

.PHONY: study test bench setup apt clean-venv

setup: $(VENV)/.installed apt

$(VENV)/.installed: requirements.lock requirements-nodeps.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Debian data packages for the offline datasets, installed only when missing.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "error: missing Debian packages:$$missing; run: sudo apt-get install -y$$missing"; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

study: setup
	$(PY) -m pixelrepa.study --profile $(PROFILE)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: setup
	$(PY) -m pixelrepa.bench

clean-venv:
	rm -rf $(VENV)
