# glmv: the two set-up commands are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BASE   := $(VENV)/.glmv-base
DEV    := $(VENV)/.glmv-dev

.PHONY: install install-dev serve test test-ray lint system-deps clean

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

# Browser, Redis and nginx for the end-to-end and deployment tests (Debian packages; skipped
# when already present). nginx is only used for `nginx -t` on docker/nginx/nginx.conf.
system-deps:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v redis-server >/dev/null 2>&1 \
			|| ! { command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; }; then \
		if [ "$$(id -u)" = "0" ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium redis-server nginx fonts-wqy-microhei >/dev/null; \
		else \
			echo "note: chromium/redis-server/nginx missing and not root; their tests will be skipped"; \
		fi; \
	fi

lint: $(DEV)
	$(PY) -m ruff check glmv tests benchmarks

test: $(DEV) system-deps
	$(PY) -m ruff check glmv tests benchmarks
	$(PY) -m pytest -q

# Only the Ray tests (glmv on Ray Serve and Ray Data, a local Ray instance; part of `make test` too).
test-ray: $(DEV) system-deps
	$(PY) -m pytest -q tests/ray

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
