"""LoRA and QLoRA: low-rank adapters on a frozen (optionally 4/8-bit) base model, via peft.

With ``lora.rank > 0`` the policy is a ``peft.PeftModel``: only the adapters' A and B matrices train
and hold optimizer state; the embeddings, the LM head (so the fused loss skips its weight-gradient
matmul) and every base weight stay frozen. Three things follow from keeping the base untouched:

- the KL reference (``loss.beta > 0``) is the same model with its adapters switched off
  (``reference_view``): no second model is loaded;
- the rollout engine gets merged weights ``W + (alpha / r) B A``, computed one layer at a time under
  the base model's parameter names (``merged_named_weights``) while the trainer's model keeps its
  adapters unmerged;
- a checkpoint is a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
  beside the trainer state, and ``export_merged`` turns one into an ordinary Hugging Face folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastgrpo.config import ConfigError, LoraConfig

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
# peft's prefix in front of the wrapped model's parameter names, and the folder a wrapped layer keeps
# its own (frozen) parameters in.
_PEFT_PREFIX = "base_model.model."
_BASE_LAYER = ".base_layer"
# Parameter names that belong to an adapter, not to the base model.
_ADAPTER_PARAM = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")
# How the vLLM engine follows the adapters (lora.sync): merged weights streamed in place
# (merged_named_weights), or the adapter itself loaded by vLLM's LoRA support (VLLMEngine.load_adapter).
SYNC_METHODS = ("merge", "adapter")
# Module types peft's LoRA can wrap (the class names of torch / transformers layers).
WRAPPABLE_TYPES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")


def lora_alpha(cfg: LoraConfig) -> float:
    return float(cfg.alpha) if cfg.alpha is not None else 2.0 * cfg.rank


def is_adapter_model(model: Any) -> bool:
    """True for a peft-wrapped policy (lora.rank > 0)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """A PEFT adapter folder (a LoRA checkpoint), as opposed to a full model folder."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


# ----------------------------------------------------------------------------- checks before loading


def check_quantize_supported(quantize: str) -> None:
    """lora.quantize needs bitsandbytes with a backend for this machine; raise ConfigError if not.

    bitsandbytes 0.50's CPU backend quantizes to NF4 and runs its forward and backward (found out on
    this project's CPU machine: a Linear4bit's forward/backward in bf16 and dequantize_4bit work), so
    4bit is allowed on CPU; LLM.int8 (8bit) is a CUDA kernel and is refused without a GPU.
    """
    if quantize == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"lora.quantize={quantize}: needs bitsandbytes (pip install 'bitsandbytes>=0.45'); "
                          "allowed without it: none", key="lora.quantize") from None
    if quantize == "8bit" and not torch.cuda.is_available():
        raise ConfigError("lora.quantize=8bit: bitsandbytes' LLM.int8 needs a CUDA GPU; on this machine use "
                          "lora.quantize=4bit (NF4 runs on bitsandbytes' CPU backend) or none", key="lora.quantize")


def check_targets(cfg: LoraConfig, model_dir: str | os.PathLike) -> None:
    """Every ``lora.target_modules`` name matches a module of the model, of a type peft can wrap.

    The model is built on the meta device from its config.json (no weights read), so this runs
    before any model loads. Raises ConfigError naming the key, the bad name and what is allowed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    by_name: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        if name:
            by_name.setdefault(name.rsplit(".", 1)[-1], set()).add(type(module).__name__)
    linear = sorted(n for n, types in by_name.items() if "Linear" in types and n != "lm_head")
    for i, target in enumerate(cfg.target_modules):
        if target not in by_name:
            raise ConfigError(f"lora.target_modules[{i}]={target!r} matches no module of {config.model_type} "
                              f"({model_dir}); allowed: {linear}", key="lora.target_modules")
        unwrappable = sorted(t for t in by_name[target] if t not in WRAPPABLE_TYPES)
        if unwrappable:
            raise ConfigError(f"lora.target_modules[{i}]={target!r} names {unwrappable} modules, which peft's LoRA "
                              f"cannot wrap (it wraps {', '.join(WRAPPABLE_TYPES)}); allowed here: {linear}", key="lora.target_modules")
        if target in ("lm_head", "embed_tokens"):
            raise ConfigError(f"lora.target_modules[{i}]={target!r}: the LM head and the embeddings stay frozen "
                              f"(the fused loss reads the head weight directly); allowed: {linear}", key="lora.target_modules")


# ----------------------------------------------------------------------------- loading


def quantization_config(cfg: LoraConfig):
    """transformers' BitsAndBytesConfig for lora.quantize (None for none): NF4 with double
    quantization and bf16 compute (QLoRA), or LLM.int8. The LM head stays unquantized."""
    if cfg.quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def wrap_model(model: torch.nn.Module, cfg: LoraConfig, adapter_dir: str | os.PathLike | None = None):
    """The policy with adapters: fresh ones (B = 0, so the model starts as the base), or those saved
    in ``adapter_dir`` (resume). Only adapter parameters require grad."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if adapter_dir is not None:
        wrapped = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    else:
        peft_config = PeftLoraConfig(r=cfg.rank, lora_alpha=lora_alpha(cfg), lora_dropout=cfg.dropout,
                                     target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
        wrapped = get_peft_model(model, peft_config)
    install_fused_forward(wrapped)
    for name, param in wrapped.named_parameters():
        if param.requires_grad and not _ADAPTER_PARAM.search(name):
            raise RuntimeError(f"peft left the base parameter {name} trainable")  # a peft behaviour change
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info("LoRA rank %d on %s: %d trainable parameters of %d (%.2f%%)", cfg.rank, list(cfg.target_modules),
             trainable, total, 100.0 * trainable / total)
    return wrapped


# ----------------------------------------------------------------------------- fused adapter forward


def install_fused_forward(model: torch.nn.Module) -> int:
    """Give every peft LoRA Linear of ``model`` the one-GEMM adapter forward (``fused_lora_forward``);
    returns how many layers got it.

    peft computes ``result + lora_B(lora_A(x)) * scaling``: the rank-r GEMM, then a multiply and an add,
    each a full pass over the ``[tokens, out]`` output, and the multiply again in the backward. On CPU
    those memory-bound passes cost as much as the adapter GEMM itself: measured on SmolLM2-135M's
    default micro-batch (1,064 packed tokens, rank 16, 1 thread), per gate/up projection the rank-16
    GEMM took ~19 ms, the multiply ~14 ms and the add ~18 ms beside the base GEMM's ~84 ms. ``addmm``
    adds ``scaling * (x A^T) B^T`` onto the base output in the GEMM itself.
    """
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.forward = fused_lora_forward.__get__(module)
            count += 1
    return count


def fused_lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA Linear forward, with the adapter added inside one ``addmm`` when the layer is the
    plain case (one active vanilla adapter, no dropout, an unquantized ``nn.Linear`` base, no adapter
    bias, one dtype, adapters on and unmerged); every other case runs peft's own forward."""
    from peft.tuners.lora import Linear as LoraLinear

    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    base = self.base_layer
    if (args or kwargs or name is None or self.disable_adapters or self.merged or name not in self.lora_A
            or name in self.lora_variant or type(base) is not torch.nn.Linear
            or not isinstance(self.lora_dropout[name], torch.nn.Identity)
            or self.lora_B[name].bias is not None or x.dtype != base.weight.dtype
            or self.lora_A[name].weight.dtype != x.dtype):
        return LoraLinear.forward(self, x, *args, **kwargs)
    result = base(x)
    down = torch.nn.functional.linear(x, self.lora_A[name].weight)  # [..., r]
    out = result.shape[-1]
    fused = torch.addmm(result.reshape(-1, out), down.reshape(-1, down.shape[-1]), self.lora_B[name].weight.t(),
                        alpha=self.scaling[name])
    return fused.view(result.shape)


# ----------------------------------------------------------------------------- reference


class _AdaptersOff(torch.nn.Module):
    """A module run with the adapters of ``policy`` switched off."""

    def __init__(self, policy, module: torch.nn.Module) -> None:
        super().__init__()
        self._policy = [policy]  # a list: not registered as a submodule
        self.inner = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._policy[0].disable_adapter():
            return self.inner(*args, **kwargs)


class ReferenceView:
    """The KL reference of a LoRA run: the policy with its adapters disabled, i.e. the frozen base
    model itself, sharing its weights (no second model). It offers what the packed forward uses
    (``model.packed_token_logprobs`` reads config, embeddings, decoder and LM head)."""

    def __init__(self, policy) -> None:
        self.policy = policy

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def get_decoder(self) -> torch.nn.Module:
        return _AdaptersOff(self.policy, self.policy.get_decoder())


def reference_view(policy) -> ReferenceView:
    if not is_adapter_model(policy):
        raise TypeError(f"reference_view needs a LoRA policy (peft.PeftModel), got {type(policy).__name__}")
    return ReferenceView(policy)


# ----------------------------------------------------------------------------- merged weights


def _base_name(name: str) -> str:
    """peft's name of a base parameter -> the Hugging Face checkpoint name."""
    name = name.removeprefix(_PEFT_PREFIX)
    return name.replace(_BASE_LAYER + ".", ".")


def merged_named_weights(model, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, W + scaling * B @ A cast to ``dtype``) for every base parameter of a
    LoRA policy (adapters off: W), tied parameters under every name, one tensor at a time.

    The sum is formed in fp32 and cast once, so a bf16 engine gets the rounding of the merged weight,
    not of W and of the update separately. A quantized base weight is dequantized first. The
    trainer's model is never changed (peft's merge would write into W and lose bits on unmerge).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for name, param in model.named_parameters(remove_duplicate=False):
            if _ADAPTER_PARAM.search(name):
                continue
            module_name, leaf = name.rsplit(".", 1)
            owner = module_name.removesuffix(_BASE_LAYER) if module_name.endswith(_BASE_LAYER) else None
            layer = layers.get(owner) if owner is not None else None
            if layer is not None and leaf == "weight":
                base = layer.get_base_layer()
                weight = dequantize_module_weight(base) if _is_quantized(param) else param
                if layer.merged:
                    raise RuntimeError(f"{owner} has its adapter merged into the base weight; the trainer never merges")
                merged = weight.detach().float()
                if not layer.disable_adapters:
                    for adapter in layer.active_adapters:
                        if adapter in layer.lora_A:
                            merged = merged + layer.get_delta_weight(adapter).float()
                tensor = merged.to(dtype)
            else:
                tensor = param.detach().to(dtype)
            yield _base_name(name), tensor


def _is_quantized(param: torch.Tensor) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


# ----------------------------------------------------------------------------- export


def adapter_base_model(adapter_dir: str | os.PathLike) -> str | None:
    """The base model folder an adapter folder names (``base_model_name_or_path``)."""
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    return config.get("base_model_name_or_path")
