"""Packed (varlen) causal attention: the one place that picks flash-attention or torch.

Sequences are packed into one row with no padding (``fastgrpo.packing``); attention must stay
inside each sequence, which ``cu_seqlens`` [S+1] int32 describes exactly as in flash-attention's
``flash_attn_varlen_func``.

Backends:
    "flash"  flash_attn.flash_attn_varlen_func (CUDA, fp16/bf16 only).
    "torch"  one ``F.scaled_dot_product_attention(is_causal=True)`` call per sequence, on 4-D
             [1, heads, L, D] views: 3-D inputs fall to SDPA's math kernel on CPU, 4-D ones get its
             flash kernel (forward and backward). Measured on a shared 2-core CPU, one thread,
             16 sequences x 200 tokens, 9 query / 3 kv heads x 64 dims, fp32: this loop took
             ~30 ms forward and ~115-145 ms forward+backward (3-D inputs: ~50 ms and ~150-180 ms);
             one SDPA call with a block-diagonal causal [T, T] boolean mask took 1.3 s and
             2.3-2.9 s (math kernel, [heads, T, T] scores: 370 MB here). Native GQA
             (``enable_gqa=True``) was as fast as repeating the k/v heads, without the copies.
    "auto"   "flash" for CUDA fp16/bf16 tensors when flash-attn is importable, else "torch".

Override hook (one for the whole package): ``set_attention_backend(name)``, or the environment
variable ``FASTGRPO_ATTENTION`` when no override is set. It applies wherever ``impl="auto"``,
which is what the transformers integration uses.

Transformers integration: importing this module registers the attention implementation
``"fastgrpo_varlen"`` (``ATTN_IMPLEMENTATION``). Load a model with
``attn_implementation="fastgrpo_varlen"`` and call its base model with ``input_ids`` [1, T],
``position_ids`` [1, T] and the FlashAttentionKwargs ``cu_seq_lens_q``/``cu_seq_lens_k`` [S+1] and
``max_length_q``/``max_length_k``; transformers forwards these kwargs unchanged down to every
attention call. A matching mask function is registered too: it returns no mask when there is no
padding mask and no KV cache (the packed training forward), so no [T, T] mask is ever built for
it. Anything else (generation with a cache or a left-padding mask) gets transformers' own SDPA
mask and is handed to transformers' SDPA attention, so the same model object still generates.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ATTN_IMPLEMENTATION",
    "BACKENDS",
    "KV_INDEX_KWARG",
    "get_attention_backend",
    "packed_attention_forward",
    "register_with_transformers",
    "resolve_backend",
    "set_attention_backend",
    "varlen_attention",
]

ATTN_IMPLEMENTATION = "fastgrpo_varlen"
BACKENDS = ("auto", "flash", "torch")
ENV_VAR = "FASTGRPO_ATTENTION"
# The keyword argument that carries a shared-prompt batch's key gather index (PackedBatch.kv_index)
# through the model's forward down to packed_attention_forward.
KV_INDEX_KWARG = "fastgrpo_kv_index"

_backend_override: str | None = None


def _check_backend(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")
    return name


def set_attention_backend(name: str | None) -> None:
    """Force the backend used wherever ``impl="auto"``; ``None`` removes the override."""
    global _backend_override
    _backend_override = None if name is None else _check_backend(name, "set_attention_backend")


def get_attention_backend() -> str:
    """The configured backend: the override, else ``$FASTGRPO_ATTENTION``, else "auto"."""
    if _backend_override is not None:
        return _backend_override
    env_value = os.environ.get(ENV_VAR, "").strip()
    if env_value:
        return _check_backend(env_value, f"environment variable {ENV_VAR}")
    return "auto"


@functools.lru_cache(maxsize=1)
def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flash_attn_varlen_func() -> Callable:
    """flash_attn.flash_attn_varlen_func (a function so tests can stand in for it on CPU)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:
        raise ImportError(
            "attention backend 'flash' needs the flash-attn package (CUDA); install it or use "
            f"backend 'torch' / 'auto' (set_attention_backend or {ENV_VAR})"
        ) from error
    return flash_attn_varlen_func


def resolve_backend(impl: str, query: Tensor) -> str:
    """The concrete backend ("flash" or "torch") for ``impl`` and a query tensor."""
    _check_backend(impl, "varlen_attention impl")
    if impl == "auto":
        impl = get_attention_backend()
    if impl != "auto":
        return impl
    flash_ok = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
    return "flash" if flash_ok and _flash_attn_installed() else "torch"


def _torch_varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    causal: bool,
    softmax_scale: float | None,
    dropout_p: float,
) -> Tensor:
    # One SDPA call per sequence: see the module docstring for the measurement against one call
    # with a block-diagonal mask. The boundaries are needed on the host (one sync per call on a
    # GPU, where this path is only the fallback).
    bounds = cu_seqlens.tolist()
    gqa = k.shape[1] != q.shape[1]
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    # torch.split, not q[start:end]: the backward of each slice writes into its own full-size zero
    # gradient, which was ~60% of a step's backward (32 sequences, 3,776 tokens, per layer 2.97 s
    # -> 1.47 s of CPU time with split; the gradients are bit-identical).
    segments = zip(q.split(lengths), k.split(lengths), v.split(lengths))
    return _sdpa_per_segment(q, v, segments, causal, softmax_scale, dropout_p, gqa)


def _sdpa_per_segment(q: Tensor, v: Tensor, segments, causal: bool, softmax_scale: float | None,
                      dropout_p: float, gqa: bool) -> Tensor:
    """One SDPA call per (q, k, v) segment ([L, H, D] each), concatenated along the tokens. A causal
    segment with more keys than queries gets a bottom-right aligned mask (its queries are the last
    ones of its keys), one [Lq, Lk] boolean mask per distinct shape."""
    masks: dict[tuple[int, int], Tensor] = {}
    outputs = []
    for q_n, k_n, v_n in segments:
        q_len, k_len = q_n.shape[0], k_n.shape[0]
        if q_len == 0:
            continue
        mask = None
        if causal and k_len != q_len:
            if (q_len, k_len) not in masks:
                masks[q_len, k_len] = _bottom_right_causal_mask(q_len, k_len, q.device)
            mask = masks[q_len, k_len]
        # [L, H, D] -> [1, H, L, D]: the batch dimension selects SDPA's CPU flash kernel.
        out = F.scaled_dot_product_attention(
            q_n.transpose(0, 1).unsqueeze(0),
            k_n.transpose(0, 1).unsqueeze(0),
            v_n.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=causal and mask is None,
            scale=softmax_scale,
            enable_gqa=gqa,
        )
        outputs.append(out[0].transpose(0, 1))
    if not outputs:
        return q.new_empty(0, q.shape[1], v.shape[2])
    return torch.cat(outputs, dim=0)


def _bottom_right_causal_mask(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """[q_len, k_len] bool: query i sees keys 0 .. k_len - q_len + i (the last query sees all)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def _torch_segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    kv_index: Tensor,
    cu_seqlens_k: Tensor,
    softmax_scale: float | None,
    dropout_p: float,
) -> Tensor:
    # One gather of the keys/values of every segment (the prompt's rows once per completion of its
    # group: only k/v, [Tk, Hk, D], never the activations the model carries), then one SDPA call per
    # segment on 4-D views as in _torch_varlen_attention. index_select's backward adds the gradients
    # of all G completions into the prompt's keys and values. A segment whose keys outnumber its
    # queries (a completion) gets a bottom-right causal boolean mask [Lq, Lk] (21 x 119 at the
    # default shapes, not [T, T]). Measured on a shared 2-core CPU, one thread, 8 groups (prompt 98,
    # G = 8, completions 21), 9/3 heads x 64, fp32, forward / forward+backward: this loop 49 / 147 ms;
    # with torch.nn.attention.bias.causal_lower_right instead of the mask 59 / 143 ms (same);
    # the same rows as 64 (prompt, completion) sequences in _torch_varlen_attention 126 / 450 ms.
    q_bounds = cu_seqlens_q.tolist()
    k_bounds = cu_seqlens_k.tolist()
    q_lengths = [end - start for start, end in zip(q_bounds[:-1], q_bounds[1:])]
    k_lengths = [end - start for start, end in zip(k_bounds[:-1], k_bounds[1:])]
    index = kv_index.to(device=k.device, dtype=torch.int64)
    gqa = k.shape[1] != q.shape[1]
    segments = zip(q.split(q_lengths), k.index_select(0, index).split(k_lengths),
                   v.index_select(0, index).split(k_lengths))
    return _sdpa_per_segment(q, v, segments, True, softmax_scale, dropout_p, gqa)


def _flash_segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    max_seqlen_q: int,
    kv_index: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_k: int,
    softmax_scale: float | None,
    dropout_p: float,
) -> Tensor:
    # NEVER RUN: written without a CUDA device or flash-attn (the tests stand in for flash's
    # function on CPU). flash-attn >= 2.1 aligns the causal mask bottom-right when a segment has
    # fewer queries than keys, which is exactly the shared-prompt mask; keys/values are gathered
    # once ([Tk, Hk, D]) and index_select's backward sums the completions' gradients into the
    # prompt's keys and values.
    flash_varlen = _flash_attn_varlen_func()
    index = kv_index.to(device=k.device, dtype=torch.int64)
    return flash_varlen(
        q,
        k.index_select(0, index),
        v.index_select(0, index),
        cu_seqlens_q=cu_seqlens_q.to(device=q.device, dtype=torch.int32),
        cu_seqlens_k=cu_seqlens_k.to(device=q.device, dtype=torch.int32),
        max_seqlen_q=int(max_seqlen_q),
        max_seqlen_k=int(max_seqlen_k),
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=True,
    )


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    impl: str = "auto",
    dropout_p: float = 0.0,
    kv_index: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> Tensor:
    """Attention within each packed sequence, flash-attention varlen semantics.

    Args:
        q: [T, Hq, D] queries of all sequences concatenated.
        k, v: [T, Hk, D] with Hq % Hk == 0 (grouped-query attention when Hk < Hq).
        cu_seqlens: [S+1] int32 (int64 accepted), 0 = cu_seqlens[0] <= ... <= cu_seqlens[S] = T.
        max_seqlen: longest sequence (used by flash-attention to size its grid).
        causal: token i of a sequence sees tokens 0..i of the same sequence only.
        softmax_scale: defaults to D ** -0.5.
        impl: "auto", "flash" or "torch" (see module docstring).
        dropout_p: attention dropout probability (0 for GRPO).
        kv_index, cu_seqlens_k, max_seqlen_k: shared-prompt groups (all three or none; causal
            only). Then ``cu_seqlens`` delimits query segments, segment n attends to the packed
            tokens ``kv_index[cu_seqlens_k[n]:cu_seqlens_k[n+1]]`` (int64 [Tk]) with a causal
            mask aligned bottom-right, and ``max_seqlen`` is the longest query segment.

    Returns:
        [T, Hq, D] in q's dtype.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be [T, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"k and v must be [T, Hk, D] matching q [T, Hq, D]: q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be [S+1] with S >= 1, got shape {tuple(cu_seqlens.shape)}")
    shared = (kv_index is not None, cu_seqlens_k is not None, max_seqlen_k is not None)
    if any(shared) and not all(shared):
        raise ValueError(
            "shared-prompt attention needs kv_index, cu_seqlens_k and max_seqlen_k together, got "
            f"kv_index={'set' if shared[0] else None}, cu_seqlens_k="
            f"{'set' if shared[1] else None}, max_seqlen_k={max_seqlen_k!r}"
        )
    if all(shared):
        if not causal:
            raise ValueError("shared-prompt attention (kv_index) is causal only, got causal=False")
        if cu_seqlens_k.shape != cu_seqlens.shape:
            raise ValueError(
                f"cu_seqlens_k {tuple(cu_seqlens_k.shape)} must have one entry per query segment "
                f"boundary like cu_seqlens {tuple(cu_seqlens.shape)}"
            )

    backend = resolve_backend(impl, q)
    if backend == "flash":
        if all(shared):
            return _flash_segment_attention(
                q, k, v, cu_seqlens, max_seqlen, kv_index, cu_seqlens_k, max_seqlen_k,
                softmax_scale, dropout_p,
            )
        flash_varlen = _flash_attn_varlen_func()
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return flash_varlen(
            q,
            k,
            v,
            cu_seqlens_q=cu,
            cu_seqlens_k=cu,
            max_seqlen_q=int(max_seqlen),
            max_seqlen_k=int(max_seqlen),
            dropout_p=dropout_p,
            softmax_scale=softmax_scale,
            causal=causal,
        )
    if int(cu_seqlens[-1]) != q.shape[0]:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but q has {q.shape[0]} tokens")
    if all(shared):
        if int(cu_seqlens_k[-1]) != kv_index.numel():
            raise ValueError(
                f"cu_seqlens_k ends at {int(cu_seqlens_k[-1])} but kv_index has "
                f"{kv_index.numel()} entries"
            )
        return _torch_segment_attention(
            q, k, v, cu_seqlens, kv_index, cu_seqlens_k, softmax_scale, dropout_p
        )
    return _torch_varlen_attention(q, k, v, cu_seqlens, causal, softmax_scale, dropout_p)


def _boundaries_from_position_ids(position_ids: Tensor, batch: int, length: int) -> Tensor:
    """cu_seqlens [S+1] over the flattened [batch * length] tokens: a sequence starts at every row
    start and wherever the position does not follow the previous one (packed rows)."""
    positions = position_ids.expand(batch, length)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    start_index = torch.nonzero(starts.reshape(-1)).flatten()
    end = torch.tensor([batch * length], device=start_index.device)
    return torch.cat([start_index, end]).to(torch.int32)


def packed_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers AttentionInterface function for ``attn_implementation="fastgrpo_varlen"``.

    query [B, Hq, T, D], key/value [B, Hk, Tk, D] -> ([B, T, Hq, D], None).

    Sequence boundaries come from kwargs ``cu_seq_lens_q`` (+ ``max_length_q``); without them,
    from ``position_ids`` (restarts mark new sequences), else every batch row is one sequence.
    With the kwarg ``fastgrpo_kv_index`` (shared-prompt groups, ``fastgrpo.shared_prefix``),
    ``cu_seq_lens_q`` delimits query segments and ``cu_seq_lens_k`` their keys gathered by it.
    A 4-D mask or a KV cache (Tk != T) goes to transformers' SDPA attention unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, num_heads, length, head_dim = query.shape
    if attention_mask is not None or key.shape[2] != length:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise ValueError(
            f"{ATTN_IMPLEMENTATION} does not support attention logit softcapping or sinks "
            f"(softcap={softcap!r}); load the model with attn_implementation='sdpa'"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    max_seqlen = kwargs.get("max_length_q")
    cu_seqlens_k = kwargs.get("cu_seq_lens_k")
    kv_index = kwargs.get(KV_INDEX_KWARG)
    if kv_index is not None:
        # Shared-prompt groups: query segments in cu_seq_lens_q, their keys gathered by kv_index.
        if batch != 1 or cu_seqlens is None or cu_seqlens_k is None or kwargs.get("max_length_k") is None:
            raise ValueError(
                f"{KV_INDEX_KWARG} needs one packed row (batch 1, got {batch}) and cu_seq_lens_q, "
                "cu_seq_lens_k, max_length_q and max_length_k"
            )
        q = query.transpose(1, 2).reshape(length, num_heads, head_dim)
        k = key.transpose(1, 2).reshape(length, key.shape[1], head_dim)
        v = value.transpose(1, 2).reshape(length, value.shape[1], value.shape[3])
        out = varlen_attention(
            q, k, v, cu_seqlens, int(max_seqlen), causal=causal, softmax_scale=scaling,
            impl="auto", dropout_p=dropout, kv_index=kv_index, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_k=int(kwargs["max_length_k"]),
        )
        return out.reshape(1, length, num_heads, -1), None
    if cu_seqlens is not None:
        if cu_seqlens_k is not None and cu_seqlens_k is not cu_seqlens:
            if not torch.equal(cu_seqlens_k, cu_seqlens):
                raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q for packed self-attention")
        if int(cu_seqlens[-1]) != batch * length:
            raise ValueError(
                f"cu_seq_lens_q ends at {int(cu_seqlens[-1])} but the input has "
                f"{batch} x {length} tokens"
            )
    else:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            cu_seqlens = _boundaries_from_position_ids(position_ids, batch, length)
        else:
            cu_seqlens = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32)
        max_seqlen = None
    if max_seqlen is None:
        max_seqlen = int(cu_seqlens.diff().max())
    if sliding_window is not None and sliding_window < int(max_seqlen):
        raise ValueError(
            f"{ATTN_IMPLEMENTATION} has no sliding-window support (sliding_window="
            f"{sliding_window} < longest sequence {int(max_seqlen)}); use attn_implementation='sdpa'"
        )

    # [B, H, T, D] -> [B*T, H, D]: the packed row(s) as one token axis.
    q = query.transpose(1, 2).reshape(batch * length, num_heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], value.shape[3])
    out = varlen_attention(
        q, k, v, cu_seqlens, int(max_seqlen), causal=causal, softmax_scale=scaling,
        impl="auto", dropout_p=dropout,
    )
    return out.reshape(batch, length, num_heads, -1), None


def _packed_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor | None:
    """AttentionMaskInterface function: no mask for the packed/no-cache forward (boundaries
    travel as cu_seqlens), transformers' SDPA mask otherwise (padding or KV cache)."""
    from transformers.masking_utils import sdpa_mask

    plain = attention_mask is None and q_length == kv_length and not q_offset and not kv_offset
    if plain:
        return None
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, attention_mask=attention_mask, **kwargs,
    )


def register_with_transformers() -> str:
    """Register ``ATTN_IMPLEMENTATION`` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _packed_mask)
    return ATTN_IMPLEMENTATION


register_with_transformers()
