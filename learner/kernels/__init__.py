"""Per-token logprobs from hidden states and the LM head without `[N, V]` fp32 logits.

`token_logprobs` runs the Triton kernel (triton_logprobs.py) on CUDA tensors and the
chunked torch version (chunked.py) everywhere else. Both give logprobs (and, with
return_entropy, entropies) in fp32 with gradients to hidden and lm_head_weight
through both outputs. Triton is imported only when a CUDA tensor comes in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.kernels.chunked import chunked_token_logprobs


def token_logprobs(hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, *, chunk_size: int,
                   temperature: float = 1.0, return_entropy: bool = False):
    """log softmax(hidden @ W^T / temperature)[targets]: hidden `[N, H]`, W `[V, H]`, targets `[N]` -> `[N]`.

    Returns (logp, entropy) when return_entropy. chunk_size bounds the `[chunk, V]`
    buffers of the torch path; the Triton path tiles instead and ignores it.
    """
    if hidden.is_cuda and hidden.dtype != torch.float64:  # the kernel has no fp64 path
        from learner.kernels.triton_logprobs import triton_token_logprobs

        return triton_token_logprobs(hidden, lm_head_weight, targets, chunk_size=chunk_size,
                                     temperature=temperature, return_entropy=return_entropy)
    return chunked_token_logprobs(hidden, lm_head_weight, targets, chunk_size=chunk_size,
                                  temperature=temperature, return_entropy=return_entropy)


__all__ = ["token_logprobs", "chunked_token_logprobs"]
