"""Decoding precision: the dtype the target, the draft and the KV cache are held in.

  decode_dtype("auto" | "bfloat16" | "float32")  -> the dtype; "auto" is bfloat16 on TPU/GPU and
                                                    float32 on CPU
  cast_params(params, dtype)                      -> a target or draft params pytree for decoding

Whatever that dtype, the forward keeps these in float32 (`models/transformer.py`): RMSNorm and
RoPE compute in float32 and round their output; attention accumulates its scores, softmax and
weighted sum in float32 (`kernels/`); `lm_head` and `draft_logits` accumulate in float32 and
return float32 logits, so the softmax, the sampling and the verification rule
(`decoding/verify.py`) read float32. The KV cache takes the target embedding's dtype (`Decoder`
and `ar.generate` create it so). On CPU "auto" stays float32 because XLA:CPU's bfloat16 matmuls
are several times slower than its float32 ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = ("auto", "bfloat16", "float32")


def decode_dtype(name: str = "auto") -> jnp.dtype:
    """The dtype `name` stands for; "auto": bfloat16 on TPU/GPU, float32 on CPU."""
    if name not in DTYPES:
        raise ValueError(f"decoding dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(name)


def cast_params(params, dtype):
    """`params` with every floating leaf in `dtype` (a leaf already in it is kept as it is);
    integer leaves (a restricted draft vocabulary's `head.ids`) are left untouched."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"parameters are cast to a floating dtype, got {dtype}")

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        return x.astype(dtype) if isinstance(x, np.ndarray) else jnp.asarray(x, dtype)

    return jax.tree.map(cast, params)
