#!/bin/sh
# Installs glmv into a virtual environment: the one install procedure of the Docker image
# (docker/Dockerfile runs it) and of the tests (tests/docker/test_docker.py runs it in a fresh venv).
#
#   sh docker/install.sh [SOURCE_DIR]        # SOURCE_DIR: a glmv checkout (default: .)
#
# Settings (environment):
#   GLMV_VENV         where the venv goes (default /opt/glmv)
#   PYTHON            interpreter that creates it (default python3)
#   GLMV_VENV_ARGS    extra `python -m venv` arguments (e.g. --system-site-packages)
#   TORCH_INDEX_URL   where torch comes from (default: the CUDA 13.0 builds of download.pytorch.org)
#   TORCH_SPEC        which torch (default: torch); GLMV_SKIP_TORCH=1 installs none
#   GLMV_EXTRAS       optional extras of glmv (default: redis,pdf: shared rate limits, PDF extraction)
#   GLMV_PIP_ARGS     extra arguments of the glmv install (the tests: --no-deps --no-build-isolation --no-index)
#   GLMV_UPGRADE_PIP  0 keeps the venv's own pip (default 1)
set -eu

SRC=${1:-.}
VENV=${GLMV_VENV:-/opt/glmv}
PYTHON=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu130}
TORCH_SPEC=${TORCH_SPEC:-torch}
GLMV_EXTRAS=${GLMV_EXTRAS:-redis,pdf}

test -f "$SRC/pyproject.toml" || { echo "install.sh: $SRC is not a glmv checkout (no pyproject.toml)" >&2; exit 2; }

# shellcheck disable=SC2086  # GLMV_VENV_ARGS and GLMV_PIP_ARGS are lists of arguments
"$PYTHON" -m venv ${GLMV_VENV_ARGS:-} "$VENV"
PIP="$VENV/bin/python -m pip --no-cache-dir --disable-pip-version-check"

if [ "${GLMV_UPGRADE_PIP:-1}" = 1 ]; then
    $PIP install -q --upgrade pip
fi

# torch first, from the CUDA index: glmv's own `torch>=2.4` is then already satisfied and pip
# does not replace it with the CPU build from PyPI.
if [ "${GLMV_SKIP_TORCH:-0}" != 1 ]; then
    $PIP install -q --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
fi

# shellcheck disable=SC2086
$PIP install -q ${GLMV_PIP_ARGS:-} "$SRC[$GLMV_EXTRAS]"

# The install works: the console script starts and the server module imports.
"$VENV/bin/glmv" --help >/dev/null
"$VENV/bin/python" -c "import glmv, glmv.server.app; print('glmv', glmv.__version__, 'installed in', '$VENV')"
