"""``fastgrpo train|eval``: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fastgrpo.config import ConfigError, load_config

log = logging.getLogger("fastgrpo")


def _setup_env() -> None:
    # The vLLM engine runs in this process: its weights are refreshed in place after every step,
    # which needs the engine core in the same process (see DESIGN.md).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cmd_train(args: argparse.Namespace) -> int:
    from fastgrpo import checkpoint as ckpt

    overrides = list(args.overrides)
    config_file = args.config
    if args.resume:
        latest = ckpt.latest_checkpoint(args.resume)
        if latest is None:
            raise ConfigError(f"--resume {args.resume}: no complete checkpoint-<step> folder there")
        # The run continues with the config it started with; command-line overrides still apply.
        saved = ckpt.load_trainer_state(latest)["config"]
        config_file = Path(args.resume) / "resume_config.yaml"
        import yaml

        config_file.write_text(yaml.safe_dump(saved))
        overrides.append(f"log.output_dir={args.resume}")
    if args.output_dir:
        overrides.append(f"log.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    cfg = load_config(config_file, overrides)

    from fastgrpo.trainer import train

    summary = train(cfg, resume=bool(args.resume))
    before = summary.get("eval_before", {}).get("eval_pass@1")
    after = summary.get("eval_after", {}).get("eval_pass@1")
    if after is not None:
        print(f"held-out accuracy: before {before if before is None else round(before, 4)} -> after {after:.4f}")
    print(f"outputs in {cfg.log.output_dir} (metrics.jsonl, checkpoint-*)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fastgrpo.data import load_problems
    from fastgrpo.eval import evaluate
    from fastgrpo.model import load_tokenizer, resolve_model_path
    from fastgrpo.rollout import make_engine

    model_dir = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_dir)
    engine = make_engine(args.engine, model_path=str(model_dir), tokenizer=tokenizer, dtype=args.dtype,
                         max_model_len=args.max_model_len, seed=args.seed)
    results = {}
    try:
        for path in args.data:
            problems = load_problems(path)
            if args.limit:
                problems = problems[: args.limit]
            res = evaluate(engine, tokenizer, problems, samples=args.samples, max_tokens=args.max_tokens,
                           temperature=args.temperature, top_p=args.top_p, template=args.template,
                           one_shot=args.one_shot, seed=args.seed)
            name = Path(path).stem
            results[name] = res
            scores = {k: v for k, v in res.items() if k.startswith("pass@")}
            print(f"{name}: n={res['n_problems']} " + " ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    finally:
        engine.close()
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
        print(f"per-problem results in {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastgrpo", description="GRPO for small reasoning LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train with GRPO (no arguments: SmolLM2-135M-Instruct on arithmetic)")
    t.add_argument("--config", help="YAML recipe (overrides only; see configs/)")
    t.add_argument("--output-dir", help="where metrics.jsonl and checkpoints go (log.output_dir)")
    t.add_argument("--max-steps", type=int, help="train.max_steps")
    t.add_argument("--resume", metavar="OUTPUT_DIR", help="continue the run in OUTPUT_DIR from its newest checkpoint")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. rollout.num_generations=4")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="pass@1 (mean over K samples) and pass@K on JSONL problem files")
    e.add_argument("--model", required=True, help="a local Hugging Face model folder, or 'default'")
    e.add_argument("--data", required=True, nargs="+", help="JSONL/parquet files with problem and answer fields")
    e.add_argument("--samples", type=int, default=1, help="K samples per problem")
    e.add_argument("--temperature", type=float, default=0.6)
    e.add_argument("--top-p", type=float, default=0.95)
    e.add_argument("--max-tokens", type=int, default=1024)
    e.add_argument("--max-model-len", type=int, default=4096)
    e.add_argument("--template", default="r1", help="prompt template: boxed | r1 | qwen")
    e.add_argument("--one-shot", action="store_true", help="prepend a worked example as a chat turn")
    e.add_argument("--limit", type=int, help="only the first N problems of each file")
    e.add_argument("--engine", default="vllm", help="vllm | transformers")
    e.add_argument("--dtype", default="bfloat16")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--output", help="write per-problem results as JSON")
    e.set_defaults(func=cmd_eval)

    from fastgrpo.plan import add_plan_arguments, run_plan

    pl = sub.add_parser("plan", help="analytical GPU memory plan: will this model/context/group fit?")
    add_plan_arguments(pl)
    pl.set_defaults(func=run_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"fastgrpo: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from fastgrpo.trainer import TrainingStopped

        if not isinstance(exc, TrainingStopped):
            raise
        print(f"fastgrpo: training stopped: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
