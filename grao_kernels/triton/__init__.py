"""The CUDA backends: triton-gemm (gemm.py, the default) and triton-tiles (tiles.py). Imported only when run."""
