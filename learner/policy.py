"""The model being trained: the HF model, plain or sharded with FSDP2, behind one forward that ends in a head.

* `PolicyModule` runs the HF model's base and then a *head* function on the final hidden
  states and the LM head weight (the fused GRPO loss, the proximal logprobs, the SFT loss).
  The head lives inside the module's forward because under FSDP2 the LM head belongs to the
  root unit (embeddings, final norm, LM head, vision patch embedding and merger), which is
  gathered only while the root module runs and reduce-scattered after its backward.
* `load_policy` at world size 1 loads the HF model as it always has. At world size N rank 0
  loads it on the CPU and the others build it on the meta device; every rank shards it
  (each decoder layer and vision block, then the root: `fully_shard`), rank 0's weights are
  broadcast into the shards (`set_model_state_dict(broadcast_from_rank0=True)`), and every
  buffer is broadcast too (rotary tables are non-persistent: in no state dict). On CUDA the
  shards all-gather in bf16 and reduce in fp32 (`MixedPrecisionPolicy`); on the CPU all is
  fp32. Gradients are summed over ranks, not averaged (the trainer's normalisers are
  global), with sum-only collectives (gloo has no PREMUL_SUM, which a divide factor uses).
* A sharded step must run the same collectives on every rank in the same order. A
  micro-batch without images would skip the vision blocks' all-gathers, so it runs the vision
  tower on a dummy image and adds 0 x its output to the loss (`dummy_vision`; verl does the
  same for Qwen2-VL under FSDP).
* `named_tensors`: the weights under their HF runtime names, for publishing and export.
  Sharded, each layer-aligned bucket is all-gathered (`DTensor.full_tensor()`) in turn, so
  every rank must iterate it and no rank holds more than one bucket beyond its shard.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from learner.distributed import Comm

log = logging.getLogger(__name__)

Head = Callable[[Tensor, Tensor], Any]  # (final hidden states [B, T, H], LM head weight [V, H]) -> anything


class PolicyModule(nn.Module):
    """The HF model and a head in one forward (see the module notes)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, inputs: dict[str, Any], head: Head,
                dummy_vision: Optional[dict[str, Tensor]] = None) -> tuple[Any, Optional[Tensor]]:
        """(head's output, a zero anchor tensor tying the dummy vision pass into the graph, or None)."""
        anchor = None
        if dummy_vision is not None:
            out = self.hf.get_image_features(**dummy_vision)
            parts = [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]
            anchor = 0.0 * sum(t.float().sum() for t in parts)
        base = getattr(self.hf, self.hf.base_model_prefix)
        hidden = base(**inputs, use_cache=False).last_hidden_state
        return head(hidden, self.hf.get_output_embeddings().weight), anchor


class Policy:
    """The trained model of one rank: the module, whether it is sharded, and the weight views built on it."""

    def __init__(self, module: PolicyModule, comm: Comm, sharded: bool) -> None:
        self.module, self.comm, self.sharded = module, comm, sharded

    @property
    def hf(self) -> nn.Module:
        return self.module.hf

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def __call__(self, inputs: dict[str, Any], head: Head, dummy_vision: Optional[dict[str, Tensor]] = None):
        return self.module(inputs, head, dummy_vision)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip to the global norm over every shard; returns the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def named_tensors(self, dtype: Optional[torch.dtype] = None, bucket_bytes: int = 256 * 2**20
                      ) -> Iterator[tuple[str, Tensor]]:
        """(HF runtime name, full tensor) of every parameter, cast to `dtype` if given. Sharded, a
        layer-aligned bucket is gathered at a time: every rank must iterate this to the end."""
        from models.hf import layer_buckets

        named = ((n, p) for n, p in self.hf.named_parameters())
        if not self.sharded:
            for n, p in named:
                t = p.detach()
                yield n, (t.to(dtype) if dtype is not None and t.dtype != dtype else t)
            return
        for bucket in layer_buckets(named, bucket_bytes):
            full = [(n, p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()) for n, p in bucket]
            for n, t in full:
                yield n, (t.to(dtype) if dtype is not None and t.dtype != dtype else t)
            del full

    def export_hf(self, out_dir: str | Path, processor: Any, dtype: Optional[torch.dtype] = None) -> Optional[Path]:
        """Write the weights as an HF model directory (config, safetensors, processor) on rank 0.

        Rank 0 collects the full state dict on the CPU (once, at the end of a run) and lets
        `save_pretrained` name and shard it as the model's own checkpoints are."""
        state = {}
        for n, t in self.named_tensors(dtype):
            if self.comm.is_main:
                state[n] = t.to("cpu", copy=True)
        out = None
        if self.comm.is_main:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.hf.save_pretrained(out, state_dict=state)
            if processor is not None:
                processor.save_pretrained(out)
        self.comm.barrier()
        return out


def sharded_blocks(hf: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: every instance of the model's `_no_split_modules` classes (for
    the Qwen-VL family, each decoder layer and each vision block), which is also how HF and verl
    pick them."""
    names = set(getattr(hf, "_no_split_modules", None) or [])
    blocks = [m for m in hf.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(hf).__name__} names no _no_split_modules: cannot pick its FSDP units")
    return blocks


def shard(module: PolicyModule, comm: Comm, *, mixed_precision: bool, cpu_offload: bool) -> None:
    """FSDP2 in place: each block, then the root; gradients summed over ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {"mesh": init_device_mesh(comm.device.type, (comm.world,))}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in sharded_blocks(module.hf):
        fully_shard(block, **kw)
    fully_shard(module, **kw)
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


def load_policy(source: str | Path, comm: Comm, *, mixed_precision: bool = False, cpu_offload: bool = False,
                gradient_checkpointing: bool = False) -> Policy:
    """The policy of this rank, from an HF model directory (see the module notes)."""
    from models.hf import empty_hf_model, load_or_init_hf_model

    device = comm.device
    if not comm.distributed:
        hf = load_or_init_hf_model(source, str(device)).train()
        _checkpointing(hf, gradient_checkpointing)
        return Policy(PolicyModule(hf), comm, sharded=False)
    if cpu_offload and device.type != "cuda":
        raise ValueError("trainer.cpu_offload needs CUDA: on the CPU the shards are in host memory already")
    hf = (load_or_init_hf_model(source, "cpu") if comm.is_main else empty_hf_model(source)).train()
    _checkpointing(hf, gradient_checkpointing)
    module = PolicyModule(hf)
    full = {k: v.detach() for k, v in module.state_dict().items()} if comm.is_main else {}
    shard(module, comm, mixed_precision=mixed_precision, cpu_offload=cpu_offload)
    if not comm.is_main:
        module.to_empty(device="cpu" if cpu_offload else device)
    _broadcast_weights(module, full, comm)
    return Policy(module, comm, sharded=True)


def _checkpointing(hf: nn.Module, on: bool) -> None:
    if on:
        if not getattr(hf, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(hf).__name__} does not support gradient checkpointing")
        # Non-reentrant: the one torch recommends, and the one that composes with FSDP2's hooks.
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _broadcast_weights(module: PolicyModule, full: dict[str, Tensor], comm: Comm) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def dummy_vision_inputs(processor: Any, device: torch.device) -> Optional[dict[str, Tensor]]:
    """Vision-tower inputs of one small black image (see the module notes), or None for a text-only model."""
    import numpy as np

    ip = getattr(processor, "image_processor", None)
    if ip is None:
        return None
    out = ip(images=[np.zeros((56, 56, 3), dtype=np.uint8)], return_tensors="pt")
    return {"pixel_values": out["pixel_values"].to(device), "image_grid_thw": out["image_grid_thw"].to(device)}
