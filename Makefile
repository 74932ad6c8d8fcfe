# The README's two commands: `make demo` and `make test`. Both create .venv and install what is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test venv system-deps bench lint clean package

demo: $(STAMP)
	$(PY) -m fleetscope demo $(DEMO_ARGS)

test: $(TEST_STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

venv: $(STAMP)

# A fresh Debian has python3 without venv/ensurepip: install python3-venv when we may.
$(VENV)/bin/python:
	@if ! $(PYTHON) -m venv $(VENV) 2>/dev/null; then \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); \
	  else echo "make: '$(PYTHON) -m venv' failed; install python3-venv (Debian) and retry" >&2; exit 1; fi; \
	fi

$(STAMP): $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all]'
	touch $(STAMP)

# The CPU build of PyTorch first, so the test extra's "torch>=..." is already satisfied.
# grafana-client gets a venv of its own (see pyproject.toml), for the `dashboards push` test.
$(TEST_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e '.[all,test]'
	$(PYTHON) -m venv .venv-grafana
	.venv-grafana/bin/python -m pip install -q -e '.[grafana]'
	touch $(TEST_STAMP)

# Debian's Prometheus and Alertmanager (promtool comes with prometheus), VictoriaMetrics (the scale-out
# metrics store), Chromium for the browser tests, and what the agent's .deb test builds, installs and checks
# it with (dpkg-deb, the python3.11 it runs on, adduser, systemd-analyze); installed only when running as root on a machine
# with apt. Tests that need them skip with a message saying so when they are absent.
system-deps:
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v prometheus-alertmanager >/dev/null || command -v alertmanager >/dev/null || missing="$$missing prometheus-alertmanager"; \
	command -v victoria-metrics >/dev/null || missing="$$missing victoria-metrics"; \
	command -v chromium >/dev/null || missing="$$missing chromium chromium-driver"; \
	command -v dpkg-deb >/dev/null || missing="$$missing dpkg"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v adduser >/dev/null || missing="$$missing adduser"; \
	[ -x /usr/bin/python3.11 ] || missing="$$missing python3.11"; \
	{ command -v slurmctld && command -v slurmd && command -v srun; } >/dev/null || missing="$$missing slurm-wlm"; \
	command -v munged >/dev/null || missing="$$missing munge"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else echo "not root or no apt: tests that need$$missing will skip"; fi; \
	fi

# dist/fleetscope-<version>-py3-none-any.whl and dist/fleetscope-agent_<version>_<arch>.deb, offline: the .deb's
# environment (/opt/fleetscope, on Debian's python3.11) gets the agent's dependencies from .venv (deploy/debian/build.py).
package: $(STAMP)
	$(PY) deploy/debian/build.py --out dist

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[all,bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) .venv-grafana .fleetscope .pytest_cache test-artifacts
