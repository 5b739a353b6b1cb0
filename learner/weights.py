"""The learner's weights as the rollout engines load them: HF names, publish dtype, buckets.

Owns `named_weights` (every parameter under the name transformers gives it at
runtime: `model.language_model.*`, `model.visual.*`, `lm_head.weight`, which is what
`actors.engine.Engine.load_weights` and vLLM's Qwen2.5-VL loader accept; tied
embeddings appear once), `layer_buckets` (groups of about N bytes that never split
a layer: vLLM finalises a layer once all its parts arrived), and a
torch.distributed broadcast of those buckets for GPU clusters.

The gRPC path needs nothing more: `LearnerServer.publish(version, named_weights(...))`
cuts its own byte chunks. The torch.distributed path (`DistributedWeightSender`,
`receive_weights`) is checked here with the gloo backend on CPU processes; with
NCCL on GPUs it is UNVERIFIED (no GPU cluster was available), and no rollout worker
calls `receive_weights` yet.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from models.hf import layer_buckets, layer_key  # noqa: F401 - re-exported: the publishers' bucketing

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def named_weights(model: Any, dtype: Optional[torch.dtype] = None) -> list[tuple[str, Tensor]]:
    """(HF name, detached tensor) of every parameter, cast to `dtype` if given (a copy then)."""
    out = []
    for name, p in model.named_parameters():
        t = p.detach()
        out.append((name, t.to(dtype) if dtype is not None and t.dtype != dtype else t))
    return out


def _flat_bytes(bucket: list[tuple[str, Tensor]], device: Any) -> Tensor:
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8).to(device) for _, t in bucket])


# ------------------------------------------------------------ torch.distributed (NCCL on GPUs: UNVERIFIED)


class DistributedWeightSender:
    """Rank 0 of a process group whose other ranks are rollout engines: broadcasts each new version.

    Per version: one object broadcast with the version and every bucket's (name, dtype,
    shape) list, then one uint8 tensor broadcast per bucket. Receivers call
    `receive_weights` in lockstep. The group is created by the caller
    (`torch.distributed.init_process_group`, or `new_group` inside an existing one).
    """

    def __init__(self, group: Any = None, device: Any = "cuda", bucket_bytes: int = 256 * 2**20) -> None:
        self.group, self.device, self.bucket_bytes = group, torch.device(device), bucket_bytes

    def send(self, version: int, named: Iterable[tuple[str, Tensor]]) -> int:
        """Broadcast `named` as `version`; returns the bytes sent."""
        import torch.distributed as dist

        buckets = list(layer_buckets(named, self.bucket_bytes))
        header = [int(version), [[(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in b] for b in buckets]]
        dist.broadcast_object_list(header, src=0, group=self.group)
        sent = 0
        for b in buckets:
            flat = _flat_bytes(b, self.device)
            dist.broadcast(flat, src=0, group=self.group)
            sent += flat.numel()
        return sent


def receive_weights(group: Any = None, device: Any = "cuda") -> tuple[int, list[tuple[str, Tensor]]]:
    """The receiving side of `DistributedWeightSender.send`: (version, [(HF name, tensor)])."""
    import torch.distributed as dist

    header: list[Any] = [None, None]
    dist.broadcast_object_list(header, src=0, group=group)
    version, layout = header
    out: list[tuple[str, Tensor]] = []
    for entries in layout:
        sizes = [torch.Size(shape).numel() * torch.empty((), dtype=DTYPES.get(dt) or getattr(torch, dt)).element_size()
                 for _, dt, shape in entries]
        flat = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=0, group=group)
        off = 0
        for (name, dt, shape), n in zip(entries, sizes):
            dtype = DTYPES.get(dt) or getattr(torch, dt)
            # clone first: a view as a wider dtype needs an aligned offset, which packing does not promise
            out.append((name, flat[off:off + n].clone().view(dtype).reshape(shape)))
            off += n
    return int(version), out
