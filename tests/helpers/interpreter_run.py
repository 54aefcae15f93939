"""Run a test module as a script under the Triton interpreter.

The interpreter has to be on before Triton decorates the kernels, which the pytest process has
already done: each kernel test module runs its interpreter cases in one fresh process with
TRITON_INTERPRET=1 (its `if __name__ == "__main__"` worker), which saves the results for the tests.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_under_interpreter(test_file: str, *args, timeout: int) -> None:
    """`python test_file *args` with TRITON_INTERPRET=1; fails the test with the worker's stderr."""
    # The worker imports `helpers.*` as the tests do: tests/ goes on its path as pytest puts it on ours.
    tests_dir = str(Path(__file__).resolve().parents[1])
    python_path = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": python_path}
    proc = subprocess.run([sys.executable, str(Path(test_file).resolve()), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
