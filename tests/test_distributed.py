"""Several training processes (FSDP2 on gloo, 2 CPU ranks) and the rollout server.

- a grpo_update on 2 ranks gives the loss, metrics and updated weights of the same global batch on
  one process;
- checkpoints resume across world sizes (1 -> 2 and 2 -> 1), optimizer state included;
- (slow) the rollout server generates with the weights the trainer pushes to it, and
  ``torchrun --nproc-per-node 2 -m fastgrpo train rollout.mode=server`` trains against it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.dist_worker import SGD_LR, make_config, make_rollout, register_test_reward
from fastgrpo import distributed
from fastgrpo.checkpoint import latest_checkpoint
from fastgrpo.config import ConfigError
from fastgrpo.model import load_policy, load_reference
from fastgrpo.optim import build_optimizer, build_scheduler
from fastgrpo.trainer import grpo_update

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "helpers" / "dist_worker.py"
CPU = torch.device("cpu")
# 2 ranks vs 1 process, fp32: the same sums in another order. Measured: weights 7e-9 apart after two
# SGD steps (lr 0.1; they moved up to 1e-2), loss 6e-8 relative; AdamW-updated weights up to 7e-7 apart
# (lr 1e-3), Adam moments 1e-6 relative.
ATOL = 1e-5


def _torchrun(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _adam_checkpoint(model_dir, out: Path, rollout_seed: int) -> Path:
    """One process: one AdamW update, then a checkpoint (step 1)."""
    from transformers import AutoTokenizer

    cfg = make_config(model_dir, out)
    policy = load_policy(model_dir)
    optimizer = build_optimizer(policy.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    grpo_update(policy, load_reference(model_dir), optimizer, make_rollout(rollout_seed), cfg, CPU)
    scheduler.step()
    return distributed.save_checkpoint(out, 1, policy, AutoTokenizer.from_pretrained(model_dir), optimizer,
                                       scheduler, {"sampler": {"position": 3}})


def _resume_one_process(model_dir, checkpoint: Path):
    """One process resuming ``checkpoint``: (policy, optimizer, scheduler, trainer state)."""
    cfg = make_config(model_dir, checkpoint.parent)
    policy = load_policy(checkpoint)
    optimizer = build_optimizer(policy.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    state = distributed.load_training_state(checkpoint, policy, optimizer, scheduler)
    return policy, optimizer, scheduler, state


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tmp_path_factory):
    """Runs tests/dist_worker.py on 2 gloo ranks once: its outputs folder."""
    root = tmp_path_factory.mktemp("distributed")
    _adam_checkpoint(tiny_model_dir, root / "single", rollout_seed=2)
    _torchrun(str(WORKER), str(tiny_model_dir), str(root / "single"), str(root), timeout=600)
    return root


def test_two_ranks_update_equals_one_process(tiny_model_dir, tmp_path, two_ranks):
    cfg = make_config(tiny_model_dir, tmp_path)
    policy = load_policy(tiny_model_dir)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    sgd = torch.optim.SGD(policy.parameters(), lr=SGD_LR)
    stats = grpo_update(policy, load_reference(tiny_model_dir), sgd, make_rollout(1), cfg, CPU)

    ranks = torch.load(two_ranks / "sgd.pt", weights_only=True)
    assert set(ranks["stats"]) == set(stats)
    for name, value in stats.items():
        # grad_norm sums 6M squares in fp32, in another order per rank: 1e-5 apart (relative) measured
        assert ranks["stats"][name] == pytest.approx(value, rel=1e-4 if name == "grad_norm" else 1e-6, abs=1e-7), name
    assert stats["loss"] != 0
    after = policy.state_dict()
    for name, value in after.items():
        torch.testing.assert_close(ranks["weights"][name], value, atol=ATOL, rtol=0, msg=name)
    moved = max((after[k] - before[k]).abs().max().item() for k in after)
    assert moved > 100 * ATOL  # the comparison can tell an update from none


def test_resume_across_world_sizes(tiny_model_dir, two_ranks):
    # 1 -> 2: the ranks resumed a one-process checkpoint and made one more update; one process does the same.
    policy, optimizer, scheduler, state = _resume_one_process(tiny_model_dir, latest_checkpoint(two_ranks / "single"))
    cfg = make_config(tiny_model_dir, two_ranks)
    stats = grpo_update(policy, load_reference(tiny_model_dir), optimizer, make_rollout(0), cfg, CPU)
    scheduler.step()
    ranks_stats = torch.load(two_ranks / "adam.pt", weights_only=True)["stats"]
    assert ranks_stats["loss"] == pytest.approx(stats["loss"], rel=1e-5, abs=1e-6)

    # ... and its checkpoint (step 2, written by rank 0) is a Hugging Face folder with those weights
    saved = latest_checkpoint(two_ranks / "run")
    assert saved.name == "checkpoint-2"
    saved_weights = load_file(str(saved / "model.safetensors"))
    for name, value in policy.state_dict().items():
        if name in saved_weights:
            torch.testing.assert_close(saved_weights[name], value, atol=ATOL, rtol=0, msg=name)
    assert "lm_head.weight" not in saved_weights  # tied to the embeddings, as the model it came from

    # 2 -> 1: one process resumes the ranks' checkpoint with the same optimizer state
    resumed, resumed_optimizer, resumed_scheduler, resumed_state = _resume_one_process(tiny_model_dir, saved)
    assert resumed_state["step"] == 2 and resumed_state["sampler"] == {"position": 3}
    assert resumed_scheduler.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]
    names = [n for n, _ in policy.named_parameters()]
    for (name, p), q in zip(policy.named_parameters(), resumed.parameters()):
        expected, got = optimizer.state[p], resumed_optimizer.state[q]
        assert float(got["step"]) == float(expected["step"]) == 4.0, name  # 2 updates x train.num_iterations=2
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-4, msg=f"{name} {key}")
    assert len(names) == len(resumed_optimizer.state)


def test_split_sequences_balances_tokens_with_equal_counts():
    lengths = [50, 3, 7, 40, 41, 2, 9, 8, 30, 1]
    parts = distributed.split_sequences(lengths, 3)
    assert sorted(i for p in parts for i in p) == list(range(10))
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(lengths) - min(lengths) and max(loads) < 80  # all-in-one: 191
    assert parts == distributed.split_sequences(lengths, 3)  # every rank computes the same split
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        distributed.split_sequences([5, 5, 5], 4)


def test_microbatches_split_to_a_count_within_the_budget():
    lengths = [30, 4, 4, 4, 20, 10]
    plans = [[0], [1, 2, 3, 5], [4]]  # 30, 22, 20 tokens
    split = distributed.split_microbatches(plans, lengths, 5)
    assert len(split) == 5 and sorted(i for p in split for i in p) == list(range(6))
    assert max(sum(lengths[i] for i in p) for p in split) <= 30
    # the busiest splittable micro-batch is cut where half its tokens are reached: 22 -> 12 + 10, 12 -> 8 + 4
    assert split == [[0], [1, 2], [3], [5], [4]]
    assert distributed.split_microbatches(plans, lengths, 3) == plans
    with pytest.raises(RuntimeError, match="cannot become 7"):
        distributed.split_microbatches(plans, lengths, 7)


def test_optimizer_state_round_trips_between_index_and_name_keys():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    names = [n for n, _ in model.named_parameters()]
    by_name = distributed.optimizer_state_by_name(optimizer.state_dict(), names)
    assert set(by_name["state"]) == set(names) and by_name["param_groups"][0]["params"] == names
    back = distributed.optimizer_state_by_index(by_name, names)
    assert back["param_groups"] == optimizer.state_dict()["param_groups"]
    torch.testing.assert_close(back["state"][3]["exp_avg"], optimizer.state_dict()["state"][3]["exp_avg"])
    with pytest.raises(ValueError, match="lacks"):
        distributed.optimizer_state_by_index(by_name, names[:-1] + ["other.weight"])


def test_several_ranks_need_the_rollout_server_and_torch_adamw(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="rollout.mode=server"):
        distributed.setup(make_config("default", tmp_path))
    with pytest.raises(ConfigError, match="train.optimizer=adamw"):
        distributed.setup(make_config("default", tmp_path, "rollout.mode=server", "train.optimizer=adamw8bit"))
    assert not distributed.is_distributed()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.setup(make_config("default", tmp_path)) == 1  # one process: nothing to join


# ----------------------------------------------------------------------------- the rollout server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rollout_server(tiny_model_dir, tmp_path_factory):
    """`python -m fastgrpo.rollout.server` on loopback with the tiny model (fp32, 1 GiB KV cache)."""
    port = _free_port()
    group_port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "fastgrpo.rollout.server", "--model", str(tiny_model_dir), "--port", str(port),
             "--group-port", str(group_port), "--dtype", "float32", "--max-model-len", "256", "--cpu-kvcache-gb", "1"],
            cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        yield {"port": port, "group_port": group_port, "log": log, "process": process}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.slow
def test_server_generates_with_the_weights_pushed_to_it(tiny_model_dir, rollout_server):
    from fastgrpo.model import packed_token_logprobs
    from fastgrpo.packing import pack_sequences
    from fastgrpo.rollout import make_engine
    from fastgrpo.rollout.server import RemoteEngine

    policy = load_policy(tiny_model_dir)
    engine = make_engine("vllm", mode="server", model=policy, server_port=rollout_server["port"],
                         server_group_port=rollout_server["group_port"], server_timeout_s=300.0)
    assert isinstance(engine, RemoteEngine) and engine.dtype == torch.float32
    prompts = [[1, 2, 3, 4, 5], [10, 20, 30]]

    def greedy_gap(model):
        """Greedy completions from the server, and their log-probs' largest distance from the model's."""
        samples = engine.generate(prompts, n=2, max_tokens=8, temperature=0.0)
        assert [s.prompt_index for s in samples] == [0, 0, 1, 1] and all(len(s.token_ids) == 8 for s in samples)
        batch = pack_sequences([prompts[s.prompt_index] for s in samples], [s.token_ids for s in samples])
        with torch.no_grad():
            mine = packed_token_logprobs(model, batch)
        server = torch.tensor([x for s in samples for x in s.logprobs])
        return [s.token_ids for s in samples], (mine - server).abs().max().item()

    before, gap = greedy_gap(policy)
    assert gap < 1e-4, gap  # measured 1e-6 (fp32 engine, fp32 trainer)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    seconds = engine.sync_weights(policy)
    after, gap = greedy_gap(policy)
    assert gap < 1e-4, gap  # the server now samples from the new weights ...
    assert after != before and seconds > 0  # ... which changed its output

    # seeded requests from several ranks cost one generation; an unseeded one is never reused
    body = {"prompt_ids": prompts, "n": 2, "max_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": 7}
    first, again = engine._call("POST", "/generate", body), engine._call("POST", "/generate", body)
    assert (first["cached"], again["cached"]) == (False, True) and first["completions"] == again["completions"]
    assert not engine._call("POST", "/generate", {**body, "seed": None})["cached"]
    with pytest.raises(ValueError, match="max_model_len 256"):
        engine.generate(prompts, n=1, max_tokens=300)
    with pytest.raises(ValueError, match="n \\(samples per prompt\\)"):
        engine.generate(prompts, n=0, max_tokens=4)
    engine.close()


@pytest.mark.slow
def test_torchrun_two_ranks_train_against_the_server(tiny_model_dir, rollout_server, tmp_path):
    out = tmp_path / "run"
    common = [f"model.path={tiny_model_dir}", "rollout.mode=server", f"rollout.server_port={rollout_server['port']}",
              f"rollout.server_group_port={rollout_server['group_port']}", "rollout.prompts_per_step=2",
              "rollout.num_generations=4", "rollout.max_completion_length=12", "data.num_train=40",
              "data.num_eval=4", "eval.max_completion_length=8", "eval.samples=2", "train.learning_rate=1e-3",
              "train.warmup_steps=0", "train.max_tokens_per_microbatch=160", "log.checkpoint_every=1",
              "reward_weights={distinct_chars: 1.0}"]
    _torchrun(str(WORKER), "train", "--output-dir", str(out), "--max-steps", "2", *common, timeout=900)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "eval" not in r]
    assert [r["step"] for r in steps] == [1, 2]  # rank 0 logs each step once
    assert all(r["logprob_mismatch"] < 1e-3 and r["grad_norm"] > 0 for r in steps)
    assert [r["eval"] for r in records if "eval" in r] == ["before", "after"]
    # one process resumes the 2-rank run for a third step
    from fastgrpo.cli import main

    register_test_reward()
    assert main(["train", "--resume", str(out), "--max-steps", "3"]) == 0
    assert latest_checkpoint(out).name == "checkpoint-3"
