"""exgrpo-fast: teacher-guided explanatory distillation (Explanatory Inversion + ExGRPO) with fused Triton kernels."""

__version__ = "0.1.0"
