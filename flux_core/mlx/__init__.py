"""The MLX backend: the klein and Z-Image transformers (and, from their own files, the Qwen3 encoder and the VAEs)
written for Apple's MLX, with the same class and parameter names as `flux_core/torch/`, loaded through the same key
maps, and run by `runtime.py` with RoPE computed once per generation, one compiled step and one evaluation per step.

Nothing here is imported unless the MLX backend is chosen (`flux_core/backend.py`), so a torch-only install never
needs mlx. On Linux, `pip install "mlx[cpu]"` gives a (slow, reference-BLAS) CPU backend used for CI parity tests.
"""
