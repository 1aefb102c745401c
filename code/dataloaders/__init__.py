"""Datasets, transforms, samplers and data preparation scripts."""
