"""``fastgrpo train|eval|export|plan|data|profile``: the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from fastgrpo.config import ConfigError, config_from_dict, load_config

log = logging.getLogger("fastgrpo")


def _setup_env() -> None:
    # The vLLM engine runs in this process: its weights are refreshed in place after every step,
    # which needs the engine core in the same process (see DESIGN.md).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cmd_train(args: argparse.Namespace) -> int:
    from fastgrpo import checkpoint as ckpt

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"log.output_dir={args.resume}")
    if args.output_dir:
        overrides.append(f"log.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.resume:
        latest = ckpt.latest_checkpoint(args.resume)
        if latest is None:
            raise ConfigError(f"--resume {args.resume}: no complete checkpoint-<step> folder there", key=None)
        # The run continues with the config it started with (read from the checkpoint, nothing is
        # written); command-line overrides still apply.
        saved = ckpt.load_trainer_state(latest).get("config")
        if saved is None:
            raise ConfigError(f"--resume {args.resume}: {latest / ckpt.STATE_FILE} holds no 'config'", key=None)
        try:
            config_from_dict(saved)  # an error in the saved config names its file; one in an override, the key
        except ConfigError as exc:
            raise ConfigError(f"--resume {args.resume}: the config saved in {latest / ckpt.STATE_FILE}: {exc}",
                              key=exc.key) from None
        cfg = config_from_dict(saved, overrides)
    else:
        cfg = load_config(args.config, overrides)

    from fastgrpo.trainer import train

    summary = train(cfg, resume=bool(args.resume))
    before = summary.get("eval_before", {}).get("eval_pass@1")
    after = summary.get("eval_after", {}).get("eval_pass@1")
    if after is not None:
        print(f"held-out accuracy: before {before if before is None else round(before, 4)} -> after {after:.4f}")
    if os.environ.get("RANK", "0") == "0":
        print(f"outputs in {cfg.log.output_dir} (metrics.jsonl, checkpoint-*)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fastgrpo.eval.suite import eval_settings, load_suite
    from fastgrpo.data.sources import default_data_dir
    from fastgrpo.lora_export import merged_model_folder
    from fastgrpo.model import resolve_model_path

    entries = [*(args.suite or []), *(args.data or [])]
    if not entries:
        raise ConfigError("fastgrpo eval needs --suite NAMES (e.g. aime24,amc23,math500) and/or --data FILES", key=None)
    try:
        settings = eval_settings(args.preset, samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                                 max_tokens=args.max_tokens, template=args.template, one_shot=args.one_shot,
                                 seed=args.seed)
        sets = load_suite(entries, args.data_dir or default_data_dir(), limit=args.limit)
    except ValueError as exc:
        raise ConfigError(str(exc), key=None) from None
    with merged_model_folder(args.model) as model_dir:  # an adapter folder is merged into its base first
        return _eval_model(args, resolve_model_path(model_dir), sets, settings)


def _eval_model(args: argparse.Namespace, model_dir: Path, sets: list, settings) -> int:
    from fastgrpo.eval.suite import markdown_table, run_suite, write_report
    from fastgrpo.preflight import longest_prompt
    from fastgrpo.model import load_tokenizer
    from fastgrpo.rollout import make_engine

    tokenizer = load_tokenizer(model_dir)
    # The engine's context holds the longest prompt plus a full-length completion.
    suite_problems = [p for s in sets for p in s.problems]
    max_model_len = args.max_model_len or longest_prompt(tokenizer, suite_problems, settings.template,
                                                         settings.one_shot)[0] + settings.max_tokens
    options = {} if args.cpu_kvcache_gb is None else {"cpu_kvcache_gb": args.cpu_kvcache_gb}
    engine = make_engine(args.engine, model_path=str(model_dir), tokenizer=tokenizer, dtype=args.dtype,
                         max_model_len=max_model_len, seed=settings.seed, **options)
    results = {}
    try:
        for s in sets:
            results.update(run_suite(engine, tokenizer, [s], settings))
            res = results[s.label]
            scores = {k: v for k, v in res.items() if k.startswith("pass@")}
            print(f"{s.label}: n={res['n_problems']} k={res['n_samples']} " + " ".join(f"{k}={v:.4f}" for k, v in scores.items()),
                  flush=True)
    finally:
        engine.close()
    out_dir = Path(args.output_dir or Path("runs") / "eval" / Path(args.model).name)
    settings_record = {"model": str(args.model), "preset": args.preset, "engine": args.engine, "dtype": args.dtype,
                       "limit": args.limit, **dataclasses.asdict(settings)}
    write_report(out_dir, results, settings_record)
    print(markdown_table(results), end="")
    print(f"results.md, results.json and per-problem <dataset>.jsonl in {out_dir}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
        print(f"all results with per-problem records in {args.output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fastgrpo.lora import is_adapter_folder
    from fastgrpo.lora_export import export_merged

    if not args.merge:
        raise ConfigError("fastgrpo export needs --merge (the only export so far: adapter + base -> one model folder)", key=None)
    if not is_adapter_folder(args.checkpoint):
        raise ConfigError(f"export --merge {args.checkpoint}: no adapter_config.json there; expected a LoRA checkpoint "
                          "(a run with lora.rank > 0) or a PEFT adapter folder", key=None)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise ConfigError(f"export --merge: {args.out} exists and is not empty; choose a new folder for the merged model", key=None)
    out = export_merged(args.checkpoint, args.out, base=args.base)
    print(f"merged model in {out}")
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

    from fastgrpo.eval.suite import PRESETS

    e = sub.add_parser("eval", help="pass@1 (mean over K samples) and pass@K on benchmark suites or problem files")
    e.add_argument("--model", required=True,
                   help="a local Hugging Face model folder, a LoRA checkpoint / PEFT adapter folder (merged into its base), or 'default'")
    e.add_argument("--suite", nargs="+", metavar="NAMES",
                   help="comma-separated set names found in DATA_DIR/eval/ (aime24,amc23,math500,minerva,olympiadbench) or paths")
    e.add_argument("--data", nargs="+", metavar="FILE", help="JSONL/parquet files with problem and answer fields")
    e.add_argument("--data-dir", help="where --suite names are found: DATA_DIR/eval/<name>.jsonl "
                                      "(default $FASTGRPO_DATA_DIR or ./data)")
    e.add_argument("--preset", choices=sorted(PRESETS),
                   help="a published protocol: deepscaler = 16 samples, temperature 0.6, top-p 0.95, 32,768 tokens; "
                        "open-rs = the same with 1 sample. Explicit flags override it")
    e.add_argument("--samples", type=int, help="K samples per problem (default 1)")
    e.add_argument("--temperature", type=float, help="default 0.6")
    e.add_argument("--top-p", type=float, help="default 0.95")
    e.add_argument("--max-tokens", type=int, help="completion budget (default 1024)")
    e.add_argument("--max-model-len", type=int, help="engine context (default: longest prompt + --max-tokens)")
    e.add_argument("--template", choices=["boxed", "r1", "qwen"], help="prompt template (default r1)")
    e.add_argument("--one-shot", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend a worked example as a chat turn (default off)")
    e.add_argument("--limit", type=int, help="only the first N problems of each set")
    e.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    e.add_argument("--dtype", default="auto", help="engine dtype: auto (bfloat16 on a GPU, float32 on CPU) | float32 | bfloat16 | float16")
    e.add_argument("--cpu-kvcache-gb", type=float, help="vLLM-CPU KV cache in GiB")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--output-dir", help="results.md, results.json and <set>.jsonl go here (default runs/eval/<model>)")
    e.add_argument("--output", help="also write every result, per-problem records included, as one JSON file")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write a LoRA checkpoint merged into its base as a Hugging Face model folder")
    x.add_argument("--merge", action="store_true", required=True, help="merge the adapter into the base weights")
    x.add_argument("checkpoint", help="a LoRA checkpoint-<step> folder (or any PEFT adapter folder)")
    x.add_argument("out", help="the new model folder (must not exist or be empty)")
    x.add_argument("--base", help="the base model folder (default: base_model_name_or_path of adapter_config.json)")
    x.set_defaults(func=cmd_export)

    from fastgrpo.perf.plan import add_plan_arguments, run_plan

    pl = sub.add_parser("plan", help="analytical GPU memory plan: will this model/context/group fit?")
    add_plan_arguments(pl)
    pl.set_defaults(func=run_plan)

    from fastgrpo.curate.pipeline import add_prepare_arguments, run_prepare

    data = sub.add_parser("data", help="data curation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="load, check gradability, dedup, decontaminate, estimate difficulty")
    add_prepare_arguments(prep)
    prep.set_defaults(func=run_prepare)

    from fastgrpo.perf.profile import add_profile_arguments, run_profile_command

    pr = sub.add_parser("profile", help="N GRPO steps timed per phase: profile.json, chart, tokens/s, MFU, memory")
    add_profile_arguments(pr)
    pr.set_defaults(func=run_profile_command)
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
