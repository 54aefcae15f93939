"""Data-parallel training on torch.distributed: FSDP2-sharded models, one global batch split across
ranks, metrics reduced, rank-0 checkpoints that resume on any world size.

Launch with ``torchrun --nproc-per-node N -m fastgrpo train ...`` (and ``--nnodes``/``--rdzv-*``
over several nodes). Without torchrun's environment (WORLD_SIZE unset or 1) every function here is a
no-op and the trainer runs as a single process, exactly as before.

How a step is split (the design choices):
- Rollouts come from one vLLM server (``rollout.mode=server``, fastgrpo/rollout/server.py) that every
  rank asks for the same global batch: the server generates it once and answers the other ranks
  from its cache. So every rank holds the whole rollout and computes the rewards and the
  group-relative advantages over all of it (the batch std of ``loss.scale_rewards=batch`` is exact,
  and no groups have to be gathered). Colocated engines (one vLLM per rank) are not supported:
  vLLM's in-process engine would join the trainer's torch.distributed world.
- Training splits the rollout's *sequences* (their advantages are already computed) over the ranks,
  balanced by tokens, equal in count (``split_sequences``). Each rank's loss is normalized by the
  global counts (sequences, tokens, micro-batches), so the per-rank losses sum to the global loss,
  and FSDP2 reduce-scatters the gradients as a plain SUM (``set_gradient_divide_factor(1.0)``;
  its default would average them, i.e. divide the global gradient by the world size).
- FSDP2 runs collectives in every forward and backward, so all ranks run the same number of
  micro-batches (``same_microbatch_count`` splits micro-batches on ranks that have fewer).
- The packed forward calls the decoder, not the model, and reads the LM-head weight outside any
  forward; ``shard_model`` makes ``model.get_decoder()`` run as the root module's forward, so FSDP2's
  hooks unshard the root's parameters (embeddings, final norm, LM head) for it, and keeps them
  unsharded until the backward has used them (FSDP2 does not reshard its root after forward).
- Checkpoints: all ranks gather the full model and optimizer state to rank 0's CPU, which writes the
  usual Hugging Face folder; the optimizer state is keyed by parameter name, so a run resumes on a
  different world size (or a single process) from it. Multi-node runs need ``log.output_dir`` on a
  filesystem every node sees (the checkpoint is read back by every rank on resume).
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fastgrpo import checkpoint as ckpt
from fastgrpo.batch import Rollout
from fastgrpo.config import Config, ConfigError

log = logging.getLogger("fastgrpo")

# Collectives wait this long before failing: the other ranks wait in the next step's first collective
# while rank 0 evaluates (eval.suite on long completions can take an hour) or writes a checkpoint; a
# dead rank should still not hang the run forever.
TIMEOUT = datetime.timedelta(hours=3)
_owns_process_group = False


# ----------------------------------------------------------------------------- process group


def launched_world_size() -> int:
    """The world size torchrun asked for (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one that logs, evaluates and writes checkpoints."""
    return rank() == 0


def setup(cfg: Config) -> int:
    """Join torchrun's process group when it launched more than one process; returns the world size.

    Backend: NCCL on CUDA (each process on the GPU ``LOCAL_RANK``), gloo on CPU. Several ranks need
    ``rollout.mode=server`` (see the module docstring) and torch's AdamW.
    """
    size = launched_world_size()
    if size <= 1 or is_distributed():
        return world_size()
    if cfg.rollout.mode != "server":
        raise ConfigError(
            f"{size} training processes need rollout.mode=server (one vLLM server shared by all ranks), "
            f"got rollout.mode={cfg.rollout.mode!r}; start `python -m fastgrpo.rollout.server --model ...` "
            "on its own device first", key="rollout.mode")
    if cfg.train.optimizer != "adamw":
        # measured: bitsandbytes' 8-bit update kernel refuses DTensors ("got mixed torch.Tensor and DTensor")
        raise ConfigError(f"train.optimizer={cfg.train.optimizer!r} cannot step FSDP2-sharded parameters; "
                          "use train.optimizer=adamw with several processes (its state is sharded too)",
                          key="train.optimizer")
    global _owns_process_group
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    _owns_process_group = True
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    if dist.get_rank() != 0:
        log.setLevel(logging.WARNING)  # rank 0 reports progress; the others only what goes wrong
    return dist.get_world_size()


def teardown() -> None:
    """Leave the process group ``setup`` joined (a colocated vLLM engine's own group is not ours)."""
    global _owns_process_group
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ----------------------------------------------------------------------------- FSDP2


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2-shard a Hugging Face causal LM across the ranks (no-op on one process); returns it.

    Every decoder layer is one FSDP unit, the root (embeddings, final norm, LM head, tied or not)
    another. Gradients are reduce-scattered as a SUM: the per-rank losses are already normalized by
    the global batch (see the module docstring). ``model.get_decoder()`` is rerouted through the
    root's forward so the packed forward and the fused loss see unsharded root parameters. Those stay
    gathered until a backward reshards them: for a frozen reference model, for the whole run (its
    embeddings and LM head: 0.9 GB in bf16 for an untied 1.5B Qwen2, on every rank).
    """
    if not is_distributed():
        return model
    from torch.distributed.fsdp import FSDPModule, fully_shard

    decoder = model.get_decoder()
    for layer in decoder.layers:
        fully_shard(layer)
    fully_shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # gloo has no PREMUL_SUM (FSDP2's op for a custom factor); a plain SUM is what we want anyway.
            module.set_force_sum_reduction_for_comms(True)

    def decoder_through_root(*args: Any, **kwargs: Any) -> Any:
        def forward(*a: Any, **kw: Any) -> Any:
            return decoder(*a, **kw)

        model.forward = forward  # an instance attribute shadows the class's forward for this call
        try:
            return model(*args, **kwargs)
        finally:
            del model.forward

    model.get_decoder = lambda: decoder_through_root
    return model


# ----------------------------------------------------------------------------- splitting the batch


def split_sequences(lengths: list[int], ranks: int) -> list[list[int]]:
    """Assign sequence indices to ``ranks`` ranks: token loads balanced, counts equal (+-1).

    Longest first, each to the least-loaded rank that still has room (ties: lowest rank); equal
    counts guarantee that every rank can match another rank's number of micro-batches.
    Deterministic, so every rank computes the same assignment. Returns ascending index lists.
    """
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if len(lengths) < ranks:
        raise ValueError(f"{len(lengths)} sequences cannot be split over {ranks} ranks: each rank needs one")
    capacity = [len(lengths) // ranks + (1 if r < len(lengths) % ranks else 0) for r in range(ranks)]
    load, parts = [0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min((r for r in range(ranks) if len(parts[r]) < capacity[r]), key=lambda r: (load[r], r))
        parts[r].append(i)
        load[r] += lengths[i]
    return [sorted(p) for p in parts]


def split_groups(prompt_index: list[int], prompt_lens: list[int], completion_lens: list[int],
                 ranks: int) -> list[list[int]]:
    """``split_sequences`` over whole groups (the sequences sharing a prompt index): a group never
    splits across ranks, so each rank packs its prompts once (``train.shared_prefix``). Groups are
    balanced by their packed tokens (prompt once + completions), equal in count (+-1). Takes
    per-sequence prompt and completion lengths; returns ascending sequence-index lists."""
    members: dict[int, list[int]] = {}
    for i, p in enumerate(prompt_index):
        members.setdefault(p, []).append(i)
    groups = list(members.values())
    if len(groups) < ranks:
        raise ValueError(f"{len(groups)} prompt groups cannot be split over {ranks} ranks with "
                         "train.shared_prefix=true (a group never splits): raise rollout.prompts_per_step "
                         "or set train.shared_prefix=false")
    parts = split_sequences([prompt_lens[g[0]] + sum(completion_lens[i] for i in g) for g in groups], ranks)
    return [sorted(i for g in part for i in groups[g]) for part in parts]


def local_rollout(rollout: Rollout, whole_groups: bool = False) -> Rollout:
    """This rank's share of a global Rollout (all of it on one process): the sequences
    ``split_sequences`` gives this rank (``split_groups`` when ``whole_groups``: a group never splits
    across ranks, so each rank packs its prompts once), selected with ``Rollout.select``."""
    if not is_distributed():
        return rollout
    lengths = [len(rollout.prompts[p]) + len(c) for p, c in zip(rollout.prompt_index, rollout.completions)]
    if whole_groups:
        mine = split_groups(list(rollout.prompt_index), [len(rollout.prompts[p]) for p in rollout.prompt_index],
                            [len(c) for c in rollout.completions], world_size())[rank()]
    else:
        mine = split_sequences(lengths, world_size())[rank()]
    return rollout.select(mine)


def same_microbatch_count(plans: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """This rank's micro-batches, split until it has as many as the rank with the most (FSDP2 runs
    collectives in every forward and backward). No-op on one process."""
    if not is_distributed():
        return plans
    count = torch.tensor([len(plans)], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return split_microbatches(plans, lengths, int(count))


def split_microbatches(plans: list[list[int]], lengths: list[int], count: int) -> list[list[int]]:
    """Split micro-batches (lists of sequence indices) until there are ``count``: the one with the
    most tokens first, into two halves by tokens, so no split exceeds the token budget. The loss
    does not depend on the grouping except for ``loss_type=bnpo`` (normalized per micro-batch)."""
    plans = [list(p) for p in plans]
    while len(plans) < count:
        splittable = [k for k, p in enumerate(plans) if len(p) > 1]
        if not splittable:
            raise RuntimeError(f"{len(plans)} single-sequence micro-batches cannot become {count}: "
                               "every rank needs as many sequences as the busiest rank has micro-batches")
        k = max(splittable, key=lambda k: sum(lengths[i] for i in plans[k]))
        seqs = plans[k]
        half, acc, cut = sum(lengths[i] for i in seqs) / 2, 0, 1
        for j, i in enumerate(seqs[:-1]):
            acc, cut = acc + lengths[i], j + 1
            if acc >= half:
                break
        plans[k:k + 1] = [seqs[:cut], seqs[cut:]]
    return plans


def global_count(local: int) -> int:
    """Sum of an integer over the ranks."""
    if not is_distributed():
        return local
    t = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t)


# ----------------------------------------------------------------------------- metrics


def reduce_step_sums(sums: dict[str, float], *totals: float) -> tuple[Any, ...]:
    """All-reduce one step's local metric sums: ``sums`` keys ending in _max/_min by MAX/MIN, the
    rest (token-weighted sums) and every one of ``totals`` by SUM. Returns (sums, *totals)."""
    if not is_distributed():
        return (sums, *totals)
    out = dict(sums)
    extremes = {"_max": dist.ReduceOp.MAX, "_min": dist.ReduceOp.MIN}
    for suffix, op in extremes.items():
        keys = sorted(k for k in sums if k.endswith(suffix))
        if keys:
            values = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(values, op=op)
            out.update(zip(keys, values.tolist()))
    keys = sorted(k for k in sums if not k.endswith(tuple(extremes)))
    values = torch.tensor([sums[k] for k in keys] + list(totals), dtype=torch.float64)
    dist.all_reduce(values)
    out.update(zip(keys, values[: len(keys)].tolist()))
    return (out, *values[len(keys):].tolist())


class NullLogger:
    """The metrics logger of ranks other than 0."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- checkpoints


class _FullModel:
    """Hands checkpoint.save_checkpoint a gathered state dict for ``save_pretrained``."""

    def __init__(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
        # The gather returns a tied weight once per name, as separate tensors, which save_pretrained
        # would then write twice; drop the aliases (lm_head.weight of a tied model), as it does.
        aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
        self.model, self.state_dict = model, {k: v for k, v in state_dict.items() if k not in aliases}

    def save_pretrained(self, path: Any, **kwargs: Any) -> None:
        self.model.save_pretrained(path, state_dict=self.state_dict, **kwargs)


class _FullOptimizer:
    """Hands checkpoint.save_checkpoint a gathered optimizer state dict."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, tokenizer: Any,
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict[str, Any],
                    keep_last: int = 2) -> Path | None:
    """``checkpoint.save_checkpoint`` for one process or many (then a collective: every rank calls it).

    With several ranks the full model state dict and the full optimizer state (keyed by parameter
    name) are gathered onto rank 0's CPU, which writes the usual folder; the others return None.
    """
    if not is_distributed():
        return ckpt.save_checkpoint(output_dir, step, model, tokenizer, optimizer, scheduler, trainer_state, keep_last)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    # full_state_dict + cpu_offload: only rank 0 receives the tensors, the others get empty dicts.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    path = None
    if is_main():
        path = ckpt.save_checkpoint(output_dir, step, _FullModel(model, model_state), tokenizer,
                                    _FullOptimizer(optimizer_state), scheduler, trainer_state, keep_last)
    barrier()  # nobody reads or prunes checkpoints while rank 0 writes one
    return path


def _optimizer_param_names(model: torch.nn.Module) -> list[str]:
    """Names of the optimizer's parameters in its order (build_optimizer keeps those requiring grad)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def optimizer_state_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter index (torch's own format) -> keyed by name
    (torch.distributed.checkpoint's full format); a name-keyed one is returned unchanged."""
    groups = state["param_groups"]
    if all(isinstance(p, str) for g in groups for p in g["params"]):
        return state
    if sum(len(g["params"]) for g in groups) != len(names):
        raise ValueError(f"the optimizer state has {sum(len(g['params']) for g in groups)} parameters, the model {len(names)}")
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups]}


def optimizer_state_by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of ``optimizer_state_by_name``: a name-keyed state -> torch's index-keyed one."""
    groups = state["param_groups"]
    if not any(isinstance(p, str) for g in groups for p in g["params"]):
        return state
    index = {name: i for i, name in enumerate(names)}
    missing = sorted({p for g in groups for p in g["params"]} - set(index))
    if missing:
        raise ValueError(f"the optimizer state names parameters the model lacks: {missing[:5]}")
    return {"state": {index[k]: s for k, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in groups]}


def load_training_state(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from ``checkpoint`` (written by any world size); return
    the trainer state. The model's weights come from the checkpoint folder itself (load_policy)."""
    # mmap: every rank of a node maps the same pages instead of holding its own copy (an fp32 Adam
    # state is 8 bytes per parameter: 12 GB for a 1.5B model, per rank without it).
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location="cpu", mmap=True)
    names = _optimizer_param_names(model)
    if is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(state, names),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optimizer_state_by_index(state, names))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    ckpt.set_rng_state(torch.load(checkpoint / "rng.pt", weights_only=True))
    return ckpt.load_trainer_state(checkpoint)
