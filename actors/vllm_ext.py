"""Code that runs inside vLLM's engine process; `actors.engine` names it by qualname.

Owns two vLLM plug-ins:
* `BanTokensLogitsProcessor`: sets the logits of the image/video placeholder
  tokens and of padding rows past the tokenizer to -inf for every request, so
  the policy can never sample them. It sits before temperature, so
  `processed_logprobs` are normalised over the same reduced vocabulary, and the
  learner applies the same mask (`models.hf.banned_token_ids`).
* `WeightReceiver`: a worker extension that loads a safetensors blob of HF-named
  tensors with the worker's `reload_weights` (the path that works on the CPU
  backend, where linear weights are repacked after load). A blob of bytes is what
  crosses the frontend -> engine-core boundary intact; tensors in
  `collective_rpc` kwargs arrive as lists.
Importing this module imports vLLM.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from models.hf import banned_token_ids


class BanTokensLogitsProcessor(LogitsProcessor):
    """Masks `banned_token_ids` for every request in the batch."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        from vllm.tokenizers import cached_tokenizer_from_config

        model_config = vllm_config.model_config
        tokenizer = cached_tokenizer_from_config(model_config)
        ids = banned_token_ids(model_config.hf_config, len(tokenizer))
        self.banned = torch.tensor(ids, dtype=torch.long, device=device)

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the argmax too, so greedy decoding applies it as well

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        return None  # the same mask for every request: no per-request state

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.banned.numel():
            logits.index_fill_(1, self.banned, float("-inf"))
        return logits


class WeightReceiver:
    """Mixed into vLLM's worker class (`worker_extension_cls`)."""

    def weft_load_weights(self, blob: bytes) -> int:
        """Load the HF-named tensors of a safetensors blob in place; return how many."""
        from safetensors.torch import load

        weights = load(bytes(blob))
        # reload_weights also resets the encoder and multimodal caches of the model runner.
        self.reload_weights(weights_iterator=list(weights.items()))  # type: ignore[attr-defined]
        return len(weights)
