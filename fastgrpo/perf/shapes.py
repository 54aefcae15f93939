"""Model shapes for the planner and the profiler: presets of the recipes' models, and the shape of any
local model folder read from its config.json (no weights loaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelShape:
    """A Llama/Mistral/Qwen2 decoder: the sizes that decide parameters and activations."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        return attn + mlp + 2 * h  # + input and post-attention RMSNorm weights

    def param_count(self) -> int:
        """Embeddings + layers + final norm (+ LM head when untied)."""
        embed = self.vocab * self.hidden
        return embed + self.layers * self.layer_params() + self.hidden + (0 if self.tied else embed)

    def param_tensor_sizes(self) -> list[int]:
        """Element counts of every parameter tensor (AdamW8bit treats tensors under 4,096 apart)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        layer = [h * q, h * kv, h * kv, q * h, h * i, h * i, i * h, h, h]
        layer += [q, kv, kv] if self.qkv_bias else []
        layer += [h] if self.o_bias else []
        layer += [i, i, h] if self.mlp_bias else []
        return [self.vocab * h] + layer * self.layers + [h] + ([] if self.tied else [self.vocab * h])


def _preset(name, model_type, hidden, inter, layers, heads, kv, vocab, tied) -> ModelShape:
    return ModelShape(name, model_type, hidden, inter, layers, heads, kv, hidden // heads, vocab, tied,
                      qkv_bias=model_type == "qwen2")


PRESETS: dict[str, ModelShape] = {
    "smollm2-135m": _preset("smollm2-135m", "llama", 576, 1536, 30, 9, 3, 49152, True),
    "qwen2.5-0.5b": _preset("qwen2.5-0.5b", "qwen2", 896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": _preset("qwen2.5-1.5b", "qwen2", 1536, 8960, 28, 12, 2, 151936, True),
    "deepseek-r1-distill-qwen-1.5b": _preset("deepseek-r1-distill-qwen-1.5b", "qwen2", 1536, 8960, 28, 12, 2,
                                             151936, False),
    "qwen2.5-7b": _preset("qwen2.5-7b", "qwen2", 3584, 18944, 28, 28, 4, 152064, False),
}
PRESETS["default"] = PRESETS["smollm2-135m"]  # fastgrpo's embedded model


def shape_from_config(config: dict, name: str = "model") -> ModelShape:
    """ModelShape from a Hugging Face config.json dict (llama, mistral or qwen2)."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{name}: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        attention_bias = bool(config.get("attention_bias", False))
        return ModelShape(
            name=name, model_type=model_type, hidden=hidden, intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]), heads=heads, kv_heads=kv_heads,
            head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
            # Llama, Mistral and Qwen2 configs all default to untied embeddings.
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,  # Qwen2 always has q/k/v biases
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
        )
    except KeyError as exc:
        raise ValueError(f"{name}: config.json lacks {exc.args[0]!r}") from None


def model_shape(name_or_dir: str | Path) -> ModelShape:
    """A preset name (see PRESETS), a local model folder holding config.json, or a config.json path."""
    path = Path(name_or_dir)
    config_file = path / "config.json" if path.is_dir() else path
    if config_file.name == "config.json" and config_file.is_file():
        return shape_from_config(json.loads(config_file.read_text()), name=str(name_or_dir))
    key = str(name_or_dir).lower()
    if key in PRESETS:
        return PRESETS[key]
    raise ValueError(f"model {str(name_or_dir)!r} is neither a folder with config.json nor a preset; "
                     f"presets: {', '.join(sorted(PRESETS))}")
