"""The CPU backends: native (native.py, csrc/'s C++ kernel) and chunked (chunked.py, PyTorch; any device)."""
