"""Throughput benchmarks of the Ray stages and the trainer (`python -m benchmarks.run`)."""
