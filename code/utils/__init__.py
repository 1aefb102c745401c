"""Shared plumbing for the 3D semi-supervised segmentation scripts."""
