#!/usr/bin/env bash
# Build bench/.venv-trl: a SEPARATE virtual environment holding TRL for bench/bench_trl.py.
# TRL is never a dependency of gspo; this venv exists only to compare against it.
# torch is pinned and installed first (the CPU wheel); an unpinned torch would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TRL_VERSION=${TRL_VERSION:-1.16.0}
if [ ! -x .venv-trl/bin/python ]; then
  "$PY" -m venv .venv-trl
fi
.venv-trl/bin/pip install -q --upgrade pip
.venv-trl/bin/pip install -q torch==2.13.0
.venv-trl/bin/pip install -q "trl==${TRL_VERSION}" datasets
.venv-trl/bin/python -c "import trl, torch, transformers; print('trl', trl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
