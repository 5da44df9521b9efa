# glmv: the two set-up commands are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BASE   := $(VENV)/.glmv-base
DEV    := $(VENV)/.glmv-dev

.PHONY: install install-dev serve test test-inprocess test-ray test-openwebui lint system-deps clean

# Open WebUI (for `make test-openwebui` only) lives in its own virtual environment, outside the
# repository: it pulls several GB of dependencies; the CPU torch goes in first to keep it smaller.
OPENWEBUI_VENV    ?= $(HOME)/.cache/glmv/openwebui-venv
OPENWEBUI_VERSION ?= 0.12.4

$(BASE): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# The CPU build of torch; on a CUDA machine install your CUDA torch first and it is kept.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	@touch $@

$(DEV): $(BASE)
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

install: $(BASE)

install-dev: $(DEV)

serve: $(BASE)
	$(VENV)/bin/glmv serve $(ARGS)

# Browser, Redis, nginx and fonts for the end-to-end and deployment tests and the document generator
# (Debian packages; skipped when already present). nginx is only used for `nginx -t` on
# docker/nginx/nginx.conf.
system-deps:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v redis-server >/dev/null 2>&1 \
			|| ! { command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; } \
			|| [ ! -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then \
		if [ "$$(id -u)" = "0" ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium redis-server nginx \
				fonts-wqy-microhei fonts-dejavu-core fonts-liberation >/dev/null; \
		else \
			echo "note: chromium/redis-server/nginx/fonts missing and not root; their tests will be skipped"; \
		fi; \
	fi

lint: $(DEV)
	$(PY) -m ruff check glmv tests benchmarks training

# The whole suite with the engine core in its own process (the default), then the engine and task
# suites again with the core in a thread of the caller (`--engine-mode inprocess`).
test: $(DEV) system-deps
	$(PY) -m ruff check glmv tests benchmarks training
	$(PY) -m pytest -q
	GLMV_ENGINE_MODE=inprocess $(PY) -m pytest -q tests/engine tests/tasks

# The engine, server and task suites with the core in-process (the server suite too; longer).
test-inprocess: $(DEV) system-deps
	GLMV_ENGINE_MODE=inprocess $(PY) -m pytest -q tests/engine tests/server tests/tasks

# Only the Ray tests (glmv on Ray Serve and Ray Data, a local Ray instance; part of `make test` too).
test-ray: $(DEV) system-deps
	$(PY) -m pytest -q tests/ray

$(OPENWEBUI_VENV)/bin/open-webui:
	$(PYTHON) -m venv $(OPENWEBUI_VENV)
	$(OPENWEBUI_VENV)/bin/python -m pip install -q --upgrade pip
	$(OPENWEBUI_VENV)/bin/python -m pip install -q torch==2.13.0
	$(OPENWEBUI_VENV)/bin/python -m pip install -q "open-webui==$(OPENWEBUI_VERSION)"

# glmv behind a real Open WebUI in default settings, driven by Chromium (tests/openwebui/run.py).
# Not part of `make test`; ARGS="--capture tests/fixtures/openwebui" refreshes the replay fixtures.
test-openwebui: $(DEV) system-deps $(OPENWEBUI_VENV)/bin/open-webui
	$(PY) -m tests.openwebui.run --venv $(OPENWEBUI_VENV) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
