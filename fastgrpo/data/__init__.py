"""Training and evaluation data: where problems come from and how prompts are drawn.

    sources.py   reading problem files (JSONL / JSON / parquet / saved datasets) and finding datasets by name
    problems.py  the built-in arithmetic task and the one train/held-out split of any data config
    prompts.py   chat prompts (templates, the one-shot example) and their token ids
    sampling.py  the resumable prompt samplers: plain epochs, weighted mixtures, data reuse

Every problem is a dict with at least ``{"problem": str, "answer": str, "id": str}``; the
arithmetic task adds ``"level": int`` and file rows keep their other fields (e.g. ``"source"``).
Answers are always strings so that AIME's ``"025"`` survives (graded by value in rewards/).
Functions take explicit arguments only; the config maps onto them in the trainer and CLI.
"""
