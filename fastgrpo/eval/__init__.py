"""Evaluation: pass@1 averaged over k samples and pass@k on held-out problems (evaluate.py), and the
benchmark suite with its presets and report tables (suite.py)."""
