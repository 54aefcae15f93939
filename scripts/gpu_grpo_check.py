"""Stage c of the GPU check: 3 GRPO steps of the R1-distill recipe (configs/r1-distill-qwen-1.5b-a40.yaml)
on a random model of DeepSeek-R1-Distill-Qwen-1.5B's shape, at reduced length, bf16, with the
transformers rollout engine and torch varlen attention (the lent machine has neither vLLM nor
flash-attn), through `fastgrpo profile`; then each phase's peak torch.cuda.max_memory_allocated beside
`fastgrpo plan`'s prediction for the same shape, settings and micro-batch.

    python scripts/gpu_grpo_check.py --out DIR --scratch DIR [--completion-length 256]

Writes DIR/profile.json, DIR/run/metrics.jsonl, DIR/grpo.json and DIR/grpo.md; the random model
(3.5 GB) goes to the scratch folder, which the report folder must not hold.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
R1_RECIPE = REPO / "configs" / "r1-distill-qwen-1.5b-a40.yaml"
R1_PRESET = "deepseek-r1-distill-qwen-1.5b"
STEPS = 3
# What differs from the recipe, and why: the lent machine has no vLLM and no bitsandbytes (8-bit AdamW);
# Liger's model patches are off so that the measured memory is the planner's model (it does not model them);
# 4 prompts x the recipe's 6 samples at 256 tokens keep the stage within its time limit.
OVERRIDES = ("data.dataset=arithmetic", "data.template=r1", "rollout.engine=transformers", "rollout.prompts_per_step=4",
             "rollout.enable_sleep_mode=false", "model.liger=false", "train.optimizer=adamw",
             "eval.before_and_after=false")
TRAIN_PHASES = ("forward", "backward", "optimizer")


def run(out: Path, scratch: Path, completion_length: int) -> dict:
    from fastgrpo.config import load_config
    from fastgrpo.perf import profile
    from fastgrpo.perf.gpu_check import same_shape_random_model
    from fastgrpo.perf.plan import GIB, GpuSpec, plan_memory
    from fastgrpo.perf.shapes import PRESETS

    if not torch.cuda.is_available():
        raise SystemExit("gpu_grpo_check.py needs a CUDA device")
    model = same_shape_random_model(scratch / "random-r1-shape")
    overrides = [f"model.path={model}", f"rollout.max_completion_length={completion_length}", *OVERRIDES]
    cfg = load_config(R1_RECIPE, overrides)
    # The chart needs matplotlib, which neither the image nor the bundle has; profile.json has its numbers.
    profile.plot_profile = lambda result, path: None
    result = profile.run_profile(cfg, steps=STEPS, out_dir=out)

    peaks = result["summary"]["peak_bytes"]
    trained = max(s["trained_tokens"] for s in result["steps"])
    micro_batch = min(trained, cfg.train.max_tokens_per_microbatch)
    props = torch.cuda.get_device_properties(0)
    gpu = GpuSpec(props.name, props.total_memory / GIB, 0.0, 0.0)  # only the capacity matters to the plan
    plan = plan_memory(PRESETS[R1_PRESET], gpu, max_len=micro_batch, group=cfg.rollout.num_generations,
                       prompts_per_step=cfg.rollout.prompts_per_step, dtype=cfg.model.dtype,
                       optimizer=cfg.train.optimizer, gradient_checkpointing=cfg.model.gradient_checkpointing,
                       beta=cfg.loss.beta, vllm_share=0.0, micro_batch_tokens=micro_batch)
    # max_memory_allocated counts tensors only: the plan's CUDA context allowance is left out.
    predicted = plan.total_bytes - plan.components.get("cuda_context", 0)
    measured = max(peaks.get(p, 0) for p in TRAIN_PHASES)
    summary = {"steps": len(result["steps"]), "micro_batch_tokens": micro_batch, "completion_length": completion_length,
               "overrides": overrides[1:], "measured_train_peak_bytes": measured, "predicted_peak_bytes": predicted,
               "measured_over_predicted": measured / predicted, "peak_bytes_per_phase": peaks,
               "plan_components": plan.components, "step_s": result["summary"]["step_s"]}
    (out / "grpo.json").write_text(json.dumps(summary, indent=1))
    lines = [f"{len(result['steps'])} GRPO steps, random R1-Distill-Qwen-1.5B-shaped model, bf16, transformers engine, "
             f"torch varlen attention, {completion_length}-token completions; the largest micro-batch {micro_batch} tokens.",
             "", "| phase | peak MiB (measured, max_memory_allocated) |", "|---|---:|"]
    lines += [f"| {p} | {b / 2**20:,.0f} |" for p, b in peaks.items()]
    lines += ["", f"training peak (forward/backward/optimizer) **{measured / 2**20:,.0f} MiB measured vs "
              f"{predicted / 2**20:,.0f} MiB predicted** by fastgrpo plan (same shape, settings and micro-batch, "
              f"no vLLM, CUDA context left out): {measured / predicted:.2f}x. The rollout phase (transformers "
              "generate's KV cache) is not in the plan, which models vLLM.", "",
              profile.format_summary(result).split("\nwrote ")[0]]  # no chart was drawn
    (out / "grpo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, required=True, help="folder for the random model (3.5 GB)")
    parser.add_argument("--completion-length", type=int, default=256)
    args = parser.parse_args(argv)
    run(args.out, args.scratch, args.completion_length)
    return 0


if __name__ == "__main__":
    sys.exit(main())
