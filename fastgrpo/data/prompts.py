"""Chat prompts: the templates, the one-shot worked example, and their token ids."""

from __future__ import annotations

from collections.abc import Mapping

# The worked example of the one-shot prompt. The generator never emits this problem, so a
# one-shot prompt never contains its own answer.
ONE_SHOT_PROBLEM = "What is 2 + 2?"
ONE_SHOT_SOLUTION = "2 + 2 = 4. The answer is \\boxed{4}."


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------

# "boxed" asks for a short answer: the default model answers within a 128-token budget. Measured
# on SmolLM2-135M-Instruct (transformers generate, 16 level-1/2 problems x 4 samples, temperature
# 1.0, 96 new tokens) with the one-shot "boxed" prompt: 81% boxed, 50% correct before training.
BOXED_INSTRUCTION = "Put your final answer within \\boxed{}."
# The sentence that DeepSeek-R1-Distill and Qwen2.5-Math are evaluated with.
REASONING_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_TEMPLATES = ("boxed", "r1", "qwen")


def build_messages(problem: str, template: str = "boxed", one_shot: bool = True) -> list[dict]:
    """Chat messages ``[{"role", "content"}, ...]`` that ask for a \\boxed{} final answer.

    templates:
      "boxed": problem + "\n" + BOXED_INSTRUCTION in the user turn; no system prompt (the chat
               template may add its default one).
      "r1":    DeepSeek-R1-Distill style: problem + "\n" + REASONING_INSTRUCTION, no system prompt.
      "qwen":  Qwen2.5-Math style: REASONING_INSTRUCTION is the system prompt, the user turn the
               bare problem.
    one_shot: put one worked example (ONE_SHOT_PROBLEM -> ONE_SHOT_SOLUTION) before the problem
    as a prior user/assistant turn. Why it is the default: measured on SmolLM2-135M-Instruct, a bare
    instruction gave 0 boxed answers in 160 completions, the one-shot prompt 66% boxed.
    """
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; valid templates: {list(PROMPT_TEMPLATES)}")
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"problem must be a non-empty string, got {problem!r}")

    instruction = {"boxed": BOXED_INSTRUCTION, "r1": REASONING_INSTRUCTION, "qwen": None}[template]

    def user_turn(text: str) -> dict:
        return {"role": "user", "content": text if instruction is None else f"{text}\n{instruction}"}

    messages = []
    if template == "qwen":
        messages.append({"role": "system", "content": REASONING_INSTRUCTION})
    if one_shot:
        messages.append(user_turn(ONE_SHOT_PROBLEM))
        messages.append({"role": "assistant", "content": ONE_SHOT_SOLUTION})
    messages.append(user_turn(problem))
    return messages


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the chat prompt, ending with the assistant generation header.

    transformers 5.x returns a BatchEncoding from ``apply_chat_template(tokenize=True)``; older
    versions a list (or a tensor with return_tensors): all become a plain list[int].
    """
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], (list, tuple)):
        if len(encoded) != 1:
            raise ValueError(f"expected the ids of one prompt, got a batch of {len(encoded)}")
        encoded = encoded[0]
    return [int(token) for token in encoded]
