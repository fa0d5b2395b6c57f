"""pyprune: structured channel pruning for PyTorch on fused C++/CUDA channel kernels."""
__version__ = "0.1.0"
