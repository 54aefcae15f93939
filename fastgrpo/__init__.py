"""fastgrpo: a GRPO trainer for small reasoning LLMs."""

__version__ = "0.1.0"
