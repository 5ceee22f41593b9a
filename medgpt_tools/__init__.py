"""Benchmarks (python -m medgpt_tools.bench) and the prepared GPU check (python -m medgpt_tools.gpu_check)."""
