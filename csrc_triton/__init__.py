"""Triton kernels and their launchers (no autograd, no policy). One kernel family per file; exgrpo_fast.ops is the
only importer."""
