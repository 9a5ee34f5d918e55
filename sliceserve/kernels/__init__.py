"""Triton kernels of the GPU fast path, each with a PyTorch reference beside it.

- rms_norm: weightless RMSNorm over the original width
- fused_linear: a product with the norm's row scale, a second product, bias, activation,
  residual and per-tile sums of squares fused in (the sliced residual step lives here)
- shortcut: the standalone shortcut step x @ S + y with the norm of the result
- gated_linear: act(x @ gate) * (x @ up) without writing either projection
- rope_store: rotary embedding of q and k, k and v written into the KV cache
- decode_attention: split-K attention of one token per row over its cached prefix
- prefill_attention: causal attention of many requests' prompt chunks in one launch
  (all three attention kernels address the cache through its block table)
- launch: programmatic dependent launch for all of them (opt-in, Hopper and later)
"""
