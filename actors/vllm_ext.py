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
* `register`: a vLLM general plugin (entry point `vllm.general_plugins` in pyproject.toml, so
  vLLM runs it in every process it starts, the engine core included) that keeps the pixels of
  every image in the requests the scheduler hands the model runner. See `register`.
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


def register() -> None:
    """Keep image data in the V1 model runner's copy of each request (the weight-update crash).

    When the scheduler first hands a request to the model runner, vLLM 0.32 strips the pixel
    tensors of every image whose placeholder tokens the prefix cache already covers
    (`strip_covered_mm_data`, keeping only M-RoPE's grid sizes): no encoder run can be scheduled
    for them, it assumes. A weight update breaks that assumption: `reset_prefix_cache(
    reset_running_requests=True)` preempts every running request and empties the prefix and
    encoder caches, so on resume the request's images must be encoded again. The V1 runner (the
    one the CPU backend uses, as V2 needs Triton; also any GPU run V2 does not support) resumes a
    preempted request from its own stored copy, whose items then hold no `pixel_values`:
    Qwen2.5-VL's `embed_multimodal` finds no image input, returns nothing, and the engine core
    dies on "Expected number of multimodal embeddings to match number of input items: 4, but got
    len(mm_embeddings)=0". In a GRPO group every member after the first hits the prefix cache on
    the shared overview, so every group has such requests. Under V1 the data is therefore kept
    (a reference with the uni executor, one copy of the pixels per request through a multiproc
    executor's queue; the encoder still runs once per image). The V2 runner rebuilds a resumed
    request from the scheduler's full copy, so under V2 vLLM's stripping stays as it is.
    """
    import vllm.v1.core.sched.output as sched_output
    import vllm.v1.core.sched.scheduler as sched

    if getattr(sched.Scheduler.__init__, "_weft", False):
        return  # vLLM may load plug-ins more than once in a process
    strip, init = sched_output.strip_covered_mm_data, sched.Scheduler.__init__
    v1_runner = [False]  # set by the (one) scheduler of this engine-core process

    def scheduler_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        v1_runner[0] = not self.use_v2_model_runner

    def strip_unless_v1(mm_features: Any, num_computed_tokens: int, uses_mrope: bool = False) -> Any:
        return mm_features if v1_runner[0] else strip(mm_features, num_computed_tokens, uses_mrope=uses_mrope)

    scheduler_init._weft = True  # type: ignore[attr-defined]
    sched.Scheduler.__init__ = scheduler_init
    sched_output.strip_covered_mm_data = strip_unless_v1
