# The README's commands. Each target sets up what it needs, so a fresh clone needs nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# The locks (requirements/*.lock, made by `make lock`): every package at the exact version and hashes the tests
# ran with, so a new machine installs what CI tested, not whatever is newest that day. rnnserve itself goes
# in after them with no dependencies of its own and the locked setuptools (no build isolation).
INSTALL_LOCKED := $(PIP) --require-hashes --no-deps -r
# setuptools says on every editable install that a folder named like the package could shadow it: here that
# folder is the package, so the note is silenced and any other warning still shows.
INSTALL_SELF := PYTHONWARNINGS="ignore:Editable installation" $(PIP) --no-deps --no-build-isolation -e .
LOCK := $(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
	--no-emit-find-links
# Debian packages the tests use as real peers: Prometheus (and promtool), docker-compose (config check),
# chromium (the playground's browser test, driven by Playwright), Redis and HAProxy (replicas sharing sessions
# behind a proxy).
SYSTEM_PACKAGES := prometheus docker-compose chromium redis-server haproxy
# Commands the tests use, as command:Debian package, installed when the command is missing: Node and npm run a
# Node client of the .proto. Checked as commands because Node often comes from elsewhere (NodeSource's nodejs
# package carries its own npm, and Debian's npm would conflict with it).
SYSTEM_COMMANDS := node:nodejs npm:npm

.PHONY: serve test bench train train-quick export quantize proto system-packages lock

$(VENV)/.serving: pyproject.toml requirements/serving.lock
	python3 -m venv $(VENV)
	$(INSTALL_LOCKED) requirements/serving.lock
	$(INSTALL_SELF)
	touch $@

$(VENV)/.dev: pyproject.toml requirements/dev.lock $(VENV)/.serving
	$(INSTALL_LOCKED) requirements/dev.lock
	$(INSTALL_SELF)
	touch $@

lock: $(VENV)/.dev  ## re-resolve every dependency at today's newest allowed versions into requirements/*.lock (see docs/INSTALL.md)
	$(LOCK) --extra train --extra dev --extra redis -o requirements/dev.lock pyproject.toml requirements/build.in
	$(LOCK) --extra redis -o requirements/serving.lock pyproject.toml requirements/build.in requirements/serving.in

serve: $(VENV)/.serving  ## serve the committed default model: gRPC on 127.0.0.1:50051, HTTP and the playground on 127.0.0.1:8080
	$(VENV)/bin/rnnserve-server --http-listen 127.0.0.1:8080

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	for c in $(SYSTEM_COMMANDS); do command -v $${c%%:*} >/dev/null 2>&1 || missing="$$missing $${c#*:}"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi

test: $(VENV)/.dev system-packages  ## install everything and run the whole test suite
	$(PY) -m pytest

bench: $(VENV)/.dev  ## run the reference workloads; writes bench/results/
	$(PY) -m bench

train: $(VENV)/.dev  ## retrain the default model (~100 min on 2 cores), then `make export`
	$(VENV)/bin/rnnserve-train --preset default --out runs/default

train-quick: $(VENV)/.dev  ## the quick configuration (~26 min on 2 cores)
	$(VENV)/bin/rnnserve-train --preset quick --out runs/quick

export: $(VENV)/.dev  ## write runs/default into the shipped model's version 1 (its float graph), quick run beside it; then `make quantize`
	$(VENV)/bin/rnnserve-export --run runs/default --out rnnserve/models/shakespeare-lstm/1 $(if $(wildcard runs/quick/checkpoint.pt),--compare runs/quick)

quantize: $(VENV)/.dev  ## version 2 of the shipped model: the int8 copy of version 1, if it costs <= 0.02 bits/char
	$(VENV)/bin/rnnserve-quantize rnnserve/models/shakespeare-lstm/1 --version 2 --out rnnserve/models/shakespeare-lstm/2

proto: $(VENV)/.dev  ## regenerate the gRPC stubs from proto/
	$(PY) proto/generate.py
