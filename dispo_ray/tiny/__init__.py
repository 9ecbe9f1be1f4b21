"""The tiny model built in code, its synthetic arithmetic task and its supervised warm start:
the embedded default that `make run` trains, and what tests and benchmarks build models from."""
