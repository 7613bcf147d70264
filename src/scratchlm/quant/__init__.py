"""Quantized weights: GGML block formats (``formats``, NumPy only) and the packed linear layers
that compute with them in place (``linear``, over the kernels of ``kernels``)."""
