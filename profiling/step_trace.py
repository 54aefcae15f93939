"""Where each phase of a traced GRPO step spends its time, op by op.

    fastgrpo profile --trace --out runs/profile      # writes runs/profile/trace.json
    python profiling/step_trace.py runs/profile/trace.json [--top 8]

Reads torch.profiler's chrome trace, in which ``fastgrpo profile --trace`` marks every phase as a
``phase::<name>`` range, and prints per phase its wall time and the ops with the most *self* time
(an op's duration minus that of the ops nested in it, so aten::linear is not counted again in its
aten::mm). Self times are summed over CPU threads; a CUDA trace's kernels are listed under the phase
whose range contains their start.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

PHASE_PREFIX = "phase::"


def load_events(path: str | Path) -> list[dict]:
    """The complete ("X") events of a chrome trace, each with a duration in microseconds."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]


def self_times(events: list[dict]) -> list[tuple[dict, float]]:
    """(event, self time in us) for every op: its duration minus its direct children's, where nesting
    is by time on the same (pid, tid). Phase ranges and other annotations are left out."""
    by_thread: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, self time]
        for e in thread_events:
            while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= e["ts"]:
                out.append(tuple(stack.pop()))
            if stack:
                stack[-1][1] -= e["dur"]
            stack.append([e, float(e["dur"])])
        out.extend(tuple(item) for item in stack)
    return [(e, t) for e, t in out if e.get("cat") != "user_annotation"]


def phase_table(events: list[dict]) -> dict[str, dict]:
    """{phase: {"wall_us": range duration, "ops": {op name: [self us, calls]}}} in trace order."""
    ranges = sorted((e for e in events if e.get("name", "").startswith(PHASE_PREFIX)), key=lambda e: e["ts"])
    table = {e["name"][len(PHASE_PREFIX):]: {"wall_us": 0.0, "ops": defaultdict(lambda: [0.0, 0])} for e in ranges}
    for e in ranges:
        table[e["name"][len(PHASE_PREFIX):]]["wall_us"] += e["dur"]
    for op, self_us in self_times(events):
        for r in ranges:  # phases do not overlap: the first range that holds the op's start
            if r["ts"] <= op["ts"] < r["ts"] + r["dur"]:
                entry = table[r["name"][len(PHASE_PREFIX):]]["ops"][op["name"]]
                entry[0] += self_us
                entry[1] += 1
                break
    return table


def format_table(table: dict[str, dict], top: int = 8) -> str:
    lines = []
    for phase, data in table.items():
        wall_ms = data["wall_us"] / 1e3
        lines.append(f"{phase}: {wall_ms:,.1f} ms")
        ranked = sorted(data["ops"].items(), key=lambda kv: -kv[1][0])[:top]
        for name, (self_us, calls) in ranked:
            share = self_us / data["wall_us"] if data["wall_us"] else 0.0
            lines.append(f"    {name[:60]:<60} {self_us / 1e3:>10,.1f} ms {share:>6.1%} {calls:>7} calls")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="trace.json written by fastgrpo profile --trace")
    parser.add_argument("--top", type=int, default=8, help="ops listed per phase (default 8)")
    args = parser.parse_args()
    print(format_table(phase_table(load_events(args.trace)), args.top))


if __name__ == "__main__":
    main()
