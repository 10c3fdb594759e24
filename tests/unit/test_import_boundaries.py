"""The package boundaries of STYLE.md, checked in fresh interpreters: the aggregator never loads model or training
code (it sees named tensors and metadata only), and the federated rules load neither model code nor a web
framework."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Model, training and export code: none of it may load in a server process.
MODEL_CODE = ("transformers", "device_sdk.models", "device_sdk.train", "device_sdk.inject", "device_sdk.lora",
              "device_sdk.strategies", "device_sdk.round", "executorch", "peft")
#: Web frameworks and HTTP clients: none of them may load with the federated rules.
WEB = ("fastapi", "starlette", "uvicorn", "httpx")


def _loaded_after(code: str, watched: tuple[str, ...]) -> list[str]:
    """The modules of ``watched`` that a fresh interpreter has loaded after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {watched!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_starting_the_aggregator_loads_no_model_code(tmp_path):
    code = (
        "import aggregator.app, aggregator.__main__\n"
        "from fastapi.testclient import TestClient\n"
        "from aggregator.settings import Settings\n"
        f"app = aggregator.app.create_app(Settings(data_dir={str(tmp_path)!r}, admin_token='a' * 32))\n"
        "with TestClient(app) as client:\n"  # runs the lifespan: store, recovery, deadline ticker
        "    assert client.get('/health').status_code == 200\n"
        "    assert client.get('/status').status_code == 200\n"
    )
    assert _loaded_after(code, MODEL_CODE) == []


def test_the_federated_rules_load_neither_a_web_framework_nor_model_code():
    code = "import device_sdk.federated\nfrom device_sdk.federated import RULES, spec_for\nRULES[spec_for('fedavg').rule]"
    assert _loaded_after(code, WEB + MODEL_CODE) == []


def test_importing_device_sdk_is_light_and_its_names_load_on_first_use():
    assert _loaded_after("import device_sdk, device_sdk.errors, device_sdk.fileio", MODEL_CODE) == []
    assert _loaded_after("from device_sdk import AdapterConfig, SDKError", MODEL_CODE) == []
    assert _loaded_after("from device_sdk import inject_adapters", ("device_sdk.inject",)) == ["device_sdk.inject"]


def test_flowers_server_app_loads_no_model_code():
    """Flower's ServerApp runs our server rules over a SimConfig; a SuperLink host needs no model code."""
    code = ("from device_sdk.flower.server_app import app\n"
            "from device_sdk.flower.wire import FlowerRun\n"
            "FlowerRun.from_run_config({'strategy': 'fedavg', 'users': 'users', 'devices': 2, 'seed': 1})")
    assert _loaded_after(code, MODEL_CODE) == []


def test_the_aggregators_help_loads_no_model_code():
    code = ("from aggregator.__main__ import main\n"
            "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass")
    assert _loaded_after(code, MODEL_CODE) == []
