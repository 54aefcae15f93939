"""Performance tools around the loop: the memory planner (plan.py) and its check against torch's
allocator (peak_memory.py), the step profiler (profile.py), and the GPU check (gpu_check.py)."""
