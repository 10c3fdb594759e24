"""Help pages, option names in errors, run folders and the client's retry rule (in-process, no model)."""

from __future__ import annotations

import argparse
import json
import socket

import pytest

from device_sdk.__main__ import build_parser
from device_sdk.cli import EVAL_TOKENS_HELP, option_message
from device_sdk.client import AggregatorClient, RetryPolicy, ServerUnreachable, check_url
from device_sdk.data.__main__ import build_parser as data_parser
from device_sdk.errors import ConfigError
from device_sdk.runfolder import MANIFEST, RunFolder, RunFolderError, claim_run_folder
from export.__main__ import PARSERS as EXPORT_PARSERS


def _subcommands(prog: str, parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {prog: parser, **{f"{prog} {name}": p for name, p in sub.choices.items()}}


def _pages() -> dict[str, argparse.ArgumentParser]:
    pages = _subcommands("python -m device_sdk", build_parser())
    pages.update(_subcommands("python -m device_sdk.data", data_parser()))
    pages.update({f"python -m export {name}": make() for name, make in EXPORT_PARSERS.items()})
    return pages


@pytest.mark.parametrize("name", list(_pages()))
def test_every_help_page_has_an_example_a_help_line_per_option_and_defaults(name):
    parser = _pages()[name]
    text = parser.format_help()
    assert "example:\n  python " in text, name
    options = {}
    for action in parser._actions:
        if not action.option_strings:
            continue
        assert action.help, f"{name}: {action.option_strings} has no help line"
        options[action.option_strings[-1]] = line = " ".join(parser._get_formatter()._expand_help(action).split())
        if not (action.required or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            assert "(default: " in line, (name, action.option_strings)
    if "--eval-tokens" in options:  # one meaning everywhere
        assert options["--eval-tokens"].startswith(EVAL_TOKENS_HELP), name
    if "--router-period" in options:  # the paper's symbols
        assert options["--router-period"].startswith("tau: ") and options["--router-steps"].startswith("s: ")


def test_export_help_lists_subcommands_and_formats():
    text = EXPORT_PARSERS["export"]().format_help()
    assert "verify" in text and "update-adapters" in text and "pte" in text and "onnx" in text


def test_config_fields_become_options():
    message = ("invalid TrainConfig: router_period must be a positive integer, got 0; steps must be >= 1; "
               "budget_step_s must be > 0 and goes with budget_mb")
    assert option_message(message) == ("invalid options: --router-period must be a positive integer, got 0; "
                                       "--steps must be >= 1; --budget-step-s must be > 0 and goes with --budget-mb")
    assert option_message("steps must be >= 1", "join") == "--local-steps must be >= 1"
    for prose in ("the expert steps of a round", "the base model must stay frozen", "see /tmp/cache_dir/x"):
        assert option_message(prose) == prose  # plain words and paths stay


def test_a_url_without_scheme_is_refused_with_a_fix():
    with pytest.raises(ConfigError, match="'localhost:8700'.*'http://localhost:8700'"):
        check_url("localhost:8700")
    assert check_url("http://127.0.0.1:8700/") == "http://127.0.0.1:8700"


def test_connection_refused_is_retried_and_ends_with_a_hint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = AggregatorClient(f"http://127.0.0.1:{port}", retry=RetryPolicy(attempts=2, base_s=0.01))
    with pytest.raises(ServerUnreachable, match=r"after 2 attempts .*is the aggregator running at"):
        client.health()


def test_a_run_folder_refuses_another_run_and_overwrite_replaces_only_sdk_folders(tmp_path):
    local = RunFolder("train-local")
    out = tmp_path / "out"
    assert claim_run_folder(out, local, {"steps": 1}) is False
    assert json.loads((out / MANIFEST).read_text())["command"] == "train-local"
    (out / "adapters").mkdir()
    with pytest.raises(RunFolderError, match="earlier train-local run.*--overwrite"):
        claim_run_folder(out, local, {"steps": 1})
    with pytest.raises(RunFolderError, match=r"another command \(train-local, not simulate\)"):
        claim_run_folder(out, RunFolder("simulate", resume_keys=()), {})
    claim_run_folder(out, local, {"steps": 2}, overwrite=True)
    assert not (out / "adapters").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(RunFolderError, match="no comigs-sdk command wrote"):
        claim_run_folder(foreign, local, {}, overwrite=True)
    assert (foreign / "thesis.tex").exists()
    # A project folder that merely holds a folder named like an SDK output (TensorBoard's runs/) is not deleted.
    project = tmp_path / "project"
    (project / "runs").mkdir(parents=True)
    (project / "src").mkdir()
    (project / "src" / "main.py").write_text("x")
    with pytest.raises(RunFolderError, match="before run manifests.*does not delete it"):
        claim_run_folder(project, local, {}, overwrite=True)
    assert (project / "src" / "main.py").exists()
    # An SDK run folder that holds this run's input (export --checkpoint out/adapters --out out) is not deleted.
    with pytest.raises(RunFolderError, match="holds this run's input .*adapters"):
        claim_run_folder(out, local, {"steps": 3}, overwrite=True, inputs=(None, out / "adapters"))
    assert (out / MANIFEST).exists()
    claim_run_folder(out, local, {"steps": 3}, overwrite=True, inputs=(tmp_path / "data",))


def test_a_run_that_failed_before_writing_anything_does_not_block_its_rerun(tmp_path):
    local = RunFolder("train-local")
    out = tmp_path / "out"
    claim_run_folder(out, local, {"model": "smollm2-13m"})  # then the model failed to load: only run.json is there
    assert claim_run_folder(out, local, {"model": "smollm2-135m"}) is False  # no --overwrite needed
    assert json.loads((out / MANIFEST).read_text())["settings"] == {"model": "smollm2-135m"}
    with pytest.raises(RunFolderError, match=r"another command \(train-local, not simulate\)"):
        claim_run_folder(out, RunFolder("simulate", resume_keys=()), {})  # another command's folder still is not
    join = RunFolder("join", option="--state", resume_keys=("data",))
    state = tmp_path / "state"
    claim_run_folder(state, join, {"data": "/users/de"})  # a typo'd data folder, say: nothing written
    assert claim_run_folder(state, join, {"data": "/users/fr"}) is False
    (state / "enrolling.json").write_text("{}")  # once the device wrote state, other data is refused again
    with pytest.raises(RunFolderError, match="other settings"):
        claim_run_folder(state, join, {"data": "/users/de"})


def test_resumable_commands_continue_their_own_runs_only(tmp_path):
    join = RunFolder("join", option="--state", resume_keys=("data",))
    state = tmp_path / "state"
    claim_run_folder(state, join, {"data": "/users/de"})
    (state / "credentials.json").write_text("{}")
    assert claim_run_folder(state, join, {"data": "/users/de"}) is True
    with pytest.raises(RunFolderError, match="--state .* other settings .*'/users/de' then, '/users/fr' now"):
        claim_run_folder(state, join, {"data": "/users/fr"})
    legacy = tmp_path / "sim"
    (legacy / "runs").mkdir(parents=True)  # a simulation cache from before run manifests: adopted
    assert claim_run_folder(legacy, RunFolder("simulate", resume_keys=()), {"data": "d"}) is True
    with pytest.raises(RunFolderError, match=r"another command \(simulate, not join\)"):
        claim_run_folder(legacy, join, {"data": "d"})


def test_aggregator_serve_help_gives_each_default_from_the_settings_and_an_example(capsys):
    from aggregator.__main__ import main
    from aggregator.settings import Settings

    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0
    for field in ("data_dir", "host", "port"):
        assert f"default: {Settings.model_fields[field].default}" in text
    assert "AGGREGATOR_ADMIN_TOKEN" in text and "example: python -m aggregator serve" in text


def test_init_federation_refuses_a_short_enroll_secret_before_contacting_anything(capsys):
    from device_sdk.__main__ import build_parser

    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["init-federation", "--server", "http://127.0.0.1:9", "--admin-token", "t",
                                   "--enroll-secret", "too-short"])
    assert done.value.code == 2
    assert "--enroll-secret has 9 characters; a secret needs at least 22" in capsys.readouterr().err
    args = build_parser().parse_args(["init-federation", "--server", "http://127.0.0.1:9", "--admin-token", "t",
                                      "--enroll-secret", "x" * 22])
    assert args.enroll_secret == "x" * 22


def test_a_second_process_on_a_run_folder_is_refused_until_the_first_ends(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "state"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; "
        "from device_sdk.runfolder import RunFolder, claim_run_folder; "
        f"claim_run_folder(Path({str(folder)!r}), RunFolder('join', option='--state', resume_keys=('data',)), "
        "{'data': 'd'}); print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        join = RunFolder("join", option="--state", resume_keys=("data",))
        with pytest.raises(RunFolderError, match="another process is using --state .* right now"):
            claim_run_folder(folder, join, {"data": "d"})
        with pytest.raises(RunFolderError, match="another process is using"):
            claim_run_folder(folder, join, {"data": "d"}, overwrite=True)  # nor deleted under it
        assert (folder / MANIFEST).exists()
    finally:
        holder.kill()
        holder.wait()
    assert claim_run_folder(folder, join, {"data": "d"}) is True  # the lock died with its process
    assert claim_run_folder(folder, join, {"data": "d"}) is True  # this process holds it now: claims again


def test_a_device_state_folder_held_by_another_process_is_refused(tmp_path):
    import subprocess
    import sys

    from device_sdk.runfolder import hold_folder

    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from device_sdk.runfolder import hold_folder; "
        f"hold_folder({str(tmp_path)!r}, 'state_dir'); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match="another process is using state_dir"):
            hold_folder(tmp_path, "state_dir")
    finally:
        holder.kill()
        holder.wait()
    hold_folder(tmp_path, "state_dir")
    hold_folder(tmp_path, "state_dir")  # again in the same process: fine
