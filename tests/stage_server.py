"""A fork server for the test suite's stage runs: `python -m alignlab ...` without paying the imports every time.

A stage run spends ~8 s of a 2-core machine importing torch, transformers, TRL, PEFT, datasets and the recipes
before it does anything, and the suite runs a few hundred of them. The server imports all of that once, never runs
a stage itself, and forks a child per run. The child is a fresh process in every way a test can observe (its own
pid, cwd, environment, argv, stdin/stdout/stderr, exit code; the module state of a process that has only imported),
and runs `alignlab.__main__` exactly as `python -m alignlab` does. Only the import work is shared.

Protocol (JSON lines on the server's stdin/stdout): the client sends {argv, cwd, env, stdout, stderr, module}
(stdout and stderr are the file paths the child's fds 1 and 2 are opened on; module is what `-m` names,
"alignlab" for a stage run); the server answers {"pid": N} after the fork and
{"status": S} (os.waitpid's) when the child has exited. One request at a time.

Fork safety: the server must have no Python thread but its main one when it forks (torch starts its own thread
pools on first use, which happens in the children). It checks, and refuses to serve otherwise (the client then
falls back to a subprocess). Native threads the imports start are the ones every forking DataLoader meets: an
OpenBLAS pool when OMP_NUM_THREADS > 1 (OpenBLAS shuts it down around fork) and pyarrow's jemalloc background
thread (jemalloc's fork handlers).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Everything a stage run imports at top level or on its first step; imported once here, shared by every child.
PRELOAD = (
    "torch",
    "transformers",
    "datasets",
    "peft",
    "trl",
    "wandb",
    "hydra",
    "deepspeed",
    "alignlab.__main__",
    "alignlab.launch",
    "alignlab.validate",
    "alignlab.data.loading",
    "alignlab.evaluation.tinyhh",
    "alignlab.recipes",
    "alignlab.recipes.pretrain",
    "alignlab.recipes.sft",
    "alignlab.recipes.rm",
    "alignlab.recipes.ppo",
    "alignlab.recipes.rejection_sampling",
    "alignlab.recipes.context_distillation",
    "alignlab.recipes.rain",
    "alignlab.recipes.eval",
    "alignlab.recipes.pipeline",
    "transformers.models.llama.modeling_llama",
    "transformers.models.gpt_neox.modeling_gpt_neox",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.qwen2.modeling_qwen2",
    "trl.trainer.sft_trainer",
    "trl.trainer.reward_trainer",
)


def python_threads() -> int:
    import threading

    return threading.active_count()


def child(request: dict, proto: tuple[int, int]) -> None:
    """In the forked child: become `python -m alignlab <argv>` in request's cwd and environment; never returns."""
    code = 1
    try:
        for fd in proto:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.close(null)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[0] = request["cwd"]  # what `python -m` puts first on the path
        import random

        random.seed()  # a fresh process would not share the server's random state (random reseeds after a
        if "numpy.random" in sys.modules:  # fork by itself; numpy's global state does not)
            sys.modules["numpy.random"].seed()
        import runpy

        # runpy replaces argv[0] with the module's file, as `python -m` does
        sys.argv = ["-m", *request["argv"]]
        try:
            runpy.run_module(request.get("module", "alignlab"), run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        # what the interpreter does at exit: join non-daemon threads, run atexit handlers, flush
        import atexit
        import threading

        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


def serve() -> None:
    # The protocol lives on private copies of fds 0 and 1; stray prints from imports go to stderr.
    proto_in, proto_out = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    preload = os.environ.get("STAGE_SERVER_PRELOAD")  # a comma-separated list instead of PRELOAD (its tests)
    for name in PRELOAD if preload is None else filter(None, preload.split(",")):
        __import__(name)
    # the environment after the imports (some set variables, e.g. torch's TORCHINDUCTOR_CACHE_DIR)
    ready = {"ready": python_threads() == 1, "python_threads": python_threads(), "env": dict(os.environ)}
    out = os.fdopen(proto_out, "w", buffering=1)
    inp = os.fdopen(proto_in, "r")
    out.write(json.dumps(ready) + "\n")
    if not ready["ready"]:
        return
    for line in inp:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(request, (proto_in, proto_out))
        out.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"status": status}) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# The client side (in the pytest process)

# Changes with every test and is never read at import time.
VOLATILE = ("PYTEST_CURRENT_TEST",)


class StageServer:
    """A server process started with `env`; `run()` answers with a CompletedProcess, or None where the server
    cannot serve a request exactly as a subprocess would (another environment: imports may read it) or is gone."""

    def __init__(self, env: dict[str, str], cwd: str):
        import subprocess

        self.env = env
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.stage_server"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        self.buffer = b""
        hello = json.loads(self.readline(None) or "{}")
        self.alive = hello.get("ready", False)
        self.imported_env = hello.get("env", {})
        if not self.alive:
            self.close()

    def readline(self, timeout: float | None) -> bytes | None:
        """The server's next line; b"" if it has exited, None if nothing came within timeout seconds."""
        import select
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            if not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return b""
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line + b"\n"

    def serves(self, env: dict[str, str]) -> bool:
        """Whether a fresh `python -m alignlab` in env would import what the server imported: every variable is
        as the server started with it, or as its imports set it (the worker's own imports set the same ones)."""
        keys = (set(env) | set(self.env) | set(self.imported_env)) - set(VOLATILE)
        same = all(env.get(k) in (self.env.get(k), self.imported_env.get(k)) for k in keys)
        return self.alive and self.proc.poll() is None and same

    def run(self, argv: list[str], cwd: str, env: dict[str, str], timeout: float, module: str = "alignlab"):
        import signal
        import subprocess
        import tempfile

        if not self.serves(env):
            return None
        with tempfile.TemporaryDirectory(prefix="stage_server_") as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            request = {
                "argv": argv,
                "cwd": str(cwd),
                "env": env,
                "stdout": out,
                "stderr": err,
                "module": module,
            }
            try:
                self.proc.stdin.write((json.dumps(request) + "\n").encode())
                pid = json.loads(self.readline(None))["pid"]
            except (OSError, ValueError):
                self.alive = False
                return None
            line = self.readline(timeout)
            timed_out = line is None
            if timed_out:
                os.kill(pid, signal.SIGKILL)
                line = self.readline(None)
            if not line:
                self.alive = False
                raise RuntimeError("the stage server died while a stage ran (see the pytest worker's stderr)")
            status = json.loads(line)["status"]
            stdout, stderr = (Path(f).read_text(errors="replace") for f in (out, err))
        args = [sys.executable, "-m", module, *argv]
        if timed_out:
            raise subprocess.TimeoutExpired(args, timeout, stdout, stderr)
        # -N for a signal, as subprocess reports it
        return subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(status), stdout, stderr)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()


if __name__ == "__main__":
    serve()
