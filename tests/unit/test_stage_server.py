"""The fork server that runs the suite's stages (tests/stage_server.py): a forked run must look to a test exactly
like `python -m <module>` in a subprocess (argv, cwd, environment, output, exit code, a fresh random state), and
a run it cannot serve that way must be left to a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.stage_server import StageServer

PROBE = "tests.unit.stage_probe"


@pytest.fixture(scope="module")
def server():
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "STAGE_SERVER_PRELOAD": "json,random,numpy.random",
        "PROBE_VAR": "server",
    }
    server = StageServer(env, str(ROOT))
    assert server.alive
    yield server
    server.close()


def probe(server, tmp_path, *argv, timeout=30, **env):
    env = {**server.env, **env}
    return server.run(list(argv), str(tmp_path), env, timeout, module=PROBE)


def test_a_forked_run_sees_its_own_argv_cwd_and_output(server, tmp_path):
    proc = probe(server, tmp_path, "exit", "0")
    assert proc.returncode == 0
    seen = json.loads(proc.stdout)
    assert seen["argv"] == ["exit", "0"]
    assert seen["cwd"] == str(tmp_path)
    assert seen["probe_var"] == "server"
    assert seen["pid"] not in (os.getpid(), server.proc.pid)
    assert seen["stdin"] == ""  # stdin is /dev/null, not the server's protocol pipe
    assert proc.stderr == "to stderr\n"
    assert proc.args == [sys.executable, "-m", PROBE, "exit", "0"]


def test_exit_codes_are_a_subprocesses(server, tmp_path):
    assert probe(server, tmp_path, "exit", "2").returncode == 2
    failed = probe(server, tmp_path, "raise")
    assert failed.returncode == 1
    assert "ValueError: probe failed" in failed.stderr
    killed = probe(server, tmp_path, "signal")
    assert killed.returncode == -15
    assert json.loads(killed.stdout)["argv"] == ["signal"]  # what it printed before the signal is kept


def test_every_run_is_a_new_process_with_its_own_random_state(server, tmp_path):
    a, b = (json.loads(probe(server, tmp_path, "exit", "0").stdout) for _ in range(2))
    assert a["pid"] != b["pid"]
    assert a["random"] != b["random"]
    assert a["numpy_random"] != b["numpy_random"]  # numpy, unlike random, does not reseed itself after a fork


def test_a_run_past_its_timeout_is_killed_and_the_server_serves_on(server, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired) as info:
        probe(server, tmp_path, "sleep", timeout=2)
    assert json.loads(info.value.output)["argv"] == ["sleep"]
    assert probe(server, tmp_path, "exit", "0").returncode == 0


def test_another_environment_is_left_to_a_subprocess(server, tmp_path):
    # a variable the server was not started with might change what an import does: not served
    assert probe(server, tmp_path, "exit", "0", PROBE_VAR="changed") is None
    assert probe(server, tmp_path, "exit", "0", SOME_NEW_VAR="1") is None
    # the test's own bookkeeping variable changes with every test and is not read by imports: served
    assert probe(server, tmp_path, "exit", "0", PYTEST_CURRENT_TEST="x").returncode == 0
    # a variable the server's own imports set, seen in the test process after the same imports: served
    server.imported_env["SET_BY_AN_IMPORT"] = "yes"
    try:
        assert probe(server, tmp_path, "exit", "0", SET_BY_AN_IMPORT="yes").returncode == 0
        assert probe(server, tmp_path, "exit", "0", SET_BY_AN_IMPORT="no") is None
    finally:
        del server.imported_env["SET_BY_AN_IMPORT"]
