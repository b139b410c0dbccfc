"""Tooling around the step: ahead-of-time compilation for TPU and GPU targets (and the
targets' figures), the step and input-pipeline benchmarks."""
