"""Run by tests/unit/test_stage_server.py as `python -m tests.unit.stage_probe <action>` through the fork server:
reports what a process can observe about itself, then exits as told."""

import json
import os
import random
import signal
import sys
import time

import numpy

action = sys.argv[1]
print(
    json.dumps(
        {
            "argv": sys.argv[1:],
            "cwd": os.getcwd(),
            "probe_var": os.environ.get("PROBE_VAR"),
            "pid": os.getpid(),
            "random": random.random(),
            "numpy_random": float(numpy.random.random()),
            "stdin": sys.stdin.read(),
        }
    )
)
print("to stderr", file=sys.stderr)
sys.stdout.flush()
if action == "exit":
    sys.exit(int(sys.argv[2]))
if action == "raise":
    raise ValueError("probe failed")
if action == "signal":
    os.kill(os.getpid(), signal.SIGTERM)
if action == "sleep":
    time.sleep(60)
