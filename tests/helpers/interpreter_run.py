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
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(Path(test_file).resolve()), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
