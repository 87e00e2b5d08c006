"""Interoperability: PyTorch weights in and out, ONNX and `jax.export` deployment."""
