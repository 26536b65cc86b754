"""Benchmarks of composed multimodal models."""
