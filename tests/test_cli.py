"""``fastgrpo train --resume``: the run continues with the config saved in its newest checkpoint."""

from __future__ import annotations

import json

import pytest

from fastgrpo import checkpoint as ckpt
from fastgrpo import trainer
from fastgrpo.cli import main
from fastgrpo.config import load_config, to_dict


def _fake_checkpoint(out, config: dict) -> None:
    """What --resume reads before training: a complete checkpoint folder's trainer state."""
    folder = out / "checkpoint-2"
    folder.mkdir(parents=True)
    (folder / ckpt.STATE_FILE).write_text(json.dumps({"step": 2, "sampler": {"position": 4}, "config": config}))


def _files(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def trained(monkeypatch):
    """Stands in for trainer.train: records the config and the resume flag it was given."""
    calls = []
    monkeypatch.setattr(trainer, "train", lambda cfg, resume=False: calls.append((cfg, resume)) or {})
    return calls


def test_resume_trains_with_the_saved_config_and_writes_nothing_into_the_folder(tmp_path, trained):
    out = tmp_path / "run"
    saved = load_config(None, ["train.learning_rate=3e-4", "rollout.num_generations=4", f"log.output_dir={out}"])
    _fake_checkpoint(out, to_dict(saved))
    before = _files(out)
    assert main(["train", "--resume", str(out), "--max-steps", "7", "loss.beta=0.02"]) == 0
    assert _files(out) == before
    ((cfg, resume),) = trained
    assert resume is True
    assert cfg.train.learning_rate == 3e-4 and cfg.rollout.num_generations == 4  # the saved run's
    assert cfg.train.max_steps == 7 and cfg.loss.beta == 0.02  # the command line's
    assert cfg.log.output_dir == str(out)


def test_a_bad_saved_config_names_the_checkpoint_and_the_key(tmp_path, trained, capsys):
    out = tmp_path / "run"
    config = to_dict(load_config(None, []))
    config["train"]["max_steps"] = "many"
    _fake_checkpoint(out, config)
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"the config saved in {out / 'checkpoint-2' / ckpt.STATE_FILE}" in err
    assert "train.max_steps: expected an integer, got 'many'" in err
    assert not trained
