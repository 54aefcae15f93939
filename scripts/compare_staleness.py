"""Steps per hour with rollout.max_staleness = 0 and 1, colocated and with the rollout server, back to
back in one invocation (times on a shared machine drift: compare within one run).

    .venv/bin/python scripts/compare_staleness.py --steps 8 --out runs/staleness [key=value ...]

Each case is a `fastgrpo train` of the default model (eval off) in its own folder; server cases start
`python -m fastgrpo.rollout.server` on a free port first and stop it after. The first step is left out
of the means (it carries the engine's warm-up, and with k = 1 nothing overlaps it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

CASES = (("colocate", 0), ("colocate", 1), ("server", 0), ("server", 1))
KEYS = ("step_s", "rollout_s", "reward_s", "train_s", "sync_s", "rollout_wait_s", "sync_wait_s", "producer_wait_s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastgrpo.rollout.server", "--model", model_dir, "--port", str(port),
           "--group-port", str(port + 1), "--dtype", "float32", "--max-model-len", "1024", "--cpu-kvcache-gb", "0.5"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def run_case(mode: str, k: int, steps: int, out: Path, extra: list[str], model_dir: str) -> dict:
    folder = out / f"{mode}-k{k}"
    args = [f"train.max_steps={steps}", "eval.before_and_after=false", f"rollout.max_staleness={k}",
            f"rollout.mode={mode}", f"log.checkpoint_every={steps}", *extra]
    server = None
    if mode == "server":
        port = free_port()
        server = start_server(model_dir, port, out / f"{mode}-k{k}-server.log")
        args += [f"rollout.server_port={port}", f"rollout.server_group_port={port + 1}"]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    t0 = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "fastgrpo", "train", "--output-dir", str(folder), *args], check=True,
                       env=env, stdout=(out / f"{mode}-k{k}.log").open("w"), stderr=subprocess.STDOUT)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps_after_first = [r for r in records if "eval" not in r and r["step"] > 1]
    means = {key: sum(r.get(key, 0.0) for r in steps_after_first) / len(steps_after_first) for key in KEYS}
    return {"mode": mode, "k": k, "wall_s": wall, **means, "steps_per_hour": 3600.0 / means["step_s"],
            "staleness_mean": sum(r["staleness_mean"] for r in steps_after_first) / len(steps_after_first)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/staleness"))
    parser.add_argument("--cases", default="all", help="all, or e.g. colocate-0,colocate-1")
    parser.add_argument("overrides", nargs="*", help="key=value for every case")
    args = parser.parse_args(argv)
    from fastgrpo.model import resolve_model_path

    model_dir = str(resolve_model_path("default", None))
    args.out.mkdir(parents=True, exist_ok=True)
    cases = CASES if args.cases == "all" else [(c.split("-")[0], int(c.split("-")[1])) for c in args.cases.split(",")]
    rows = []
    for mode, k in cases:
        rows.append(run_case(mode, k, args.steps, args.out, args.overrides, model_dir))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| mode | k | steps/hour | step_s | rollout_s | train_s | sync_s | trainer waited | sync waited | producer waited |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['k']} | {r['steps_per_hour']:.0f} | {r['step_s']:.1f} | {r['rollout_s']:.1f} | "
              f"{r['train_s']:.1f} | {r['sync_s']:.2f} | {r['rollout_wait_s']:.1f} | {r['sync_wait_s']:.1f} | "
              f"{r['producer_wait_s']:.1f} |")
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
