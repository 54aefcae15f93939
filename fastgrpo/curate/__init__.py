"""``fastgrpo data prepare``: pipeline.py runs the steps (steps.py) that clean a problem set, using
text matching (matching.py) and a model's pass rates (difficulty.py)."""
