# The README's commands. Each target sets up what it needs, so a fresh clone needs nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# Debian packages the tests use as real peers: Prometheus (and promtool), docker-compose (config check),
# chromium (the playground's browser test, driven by Playwright), Redis and HAProxy (replicas sharing sessions
# behind a proxy).
SYSTEM_PACKAGES := prometheus docker-compose chromium redis-server haproxy
# Commands the tests use, as command:Debian package, installed when the command is missing: Node and npm run a
# Node client of the .proto. Checked as commands because Node often comes from elsewhere (NodeSource's nodejs
# package carries its own npm, and Debian's npm would conflict with it).
SYSTEM_COMMANDS := node:nodejs npm:npm

.PHONY: serve test bench train train-quick export quantize proto system-packages

$(VENV)/.serving: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.serving
	$(PIP) -e '.[train,dev,redis]'
	touch $@

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
