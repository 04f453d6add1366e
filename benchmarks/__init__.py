"""Benchmarks: model throughput, memory and FLOPs (`benchmark.py`), input pipeline."""
