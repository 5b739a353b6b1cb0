"""`weft plan`: per-rank memory of the sharded learner, from a model's config.json alone.

The model is built on the meta device (shapes, no storage), so a 32B plan needs no weights and
no GPU. What it counts, per rank, at world size N (FSDP2, weft's defaults on CUDA):
* parameters, gradients and AdamW state, fp32 and sharded: 4 + 4 + 8 bytes a parameter, / N;
* gathered units: FSDP2 all-gathers one unit (a decoder layer or vision block) at a time and
  prefetches the next (2 x the largest unit in bf16), and holds the unit's full fp32 gradient
  until it is reduce-scattered; the root unit (embeddings, LM head, final norm, vision patch
  embedding and merger) stays gathered for the whole forward and backward;
* activations of T tokens in bf16: a decoder layer saves about T x (6H + 2H_kv + k I) values
  for backward (norm inputs and outputs, q, k, v, the attention output, the MLP's inputs and
  intermediates; k = 4 for a gated MLP, 2 for a plain one), a vision block the same with its
  own sizes over the image patches (merge^2 patches per image token); with activation
  checkpointing only each layer's input is kept, plus one layer's full set while it is
  recomputed;
* the loss: the fused kernel's two [chunk, V] fp32 buffers, its fp32 dW accumulator [V, H]
  and dL/dhidden for the loss tokens.
* with `reference` (a KL term: loss.kl_coef or loss.kl_in_reward > 0, as every paper recipe
  has): the frozen reference policy, loaded and sharded like the policy, fp32 (4 bytes a
  parameter, / N). Its no-grad pass runs before the policy's update, so its gathered units are
  not held at the same time as the policy's activations, and are not counted.
It is an estimate: allocator fragmentation, NCCL buffers and the CUDA context (a few GB) are
not in it, and a run's own peak says more; `bench/learner.py` and the GPU check measure them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

GIB = 2**30


@dataclass
class Plan:
    name: str
    world_size: int
    params: int  # total parameters
    rows: dict[str, float]  # bytes per rank

    @property
    def total(self) -> float:
        return sum(self.rows.values())


def _unit_sizes(model: Any) -> tuple[list[int], int]:
    """(parameters of each FSDP unit below the root, parameters left to the root)."""
    from learner.policy import sharded_blocks

    blocks = sharded_blocks(model)
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    return sizes, sum(p.numel() for p in model.parameters()) - sum(sizes)


def _linear_count(module: Any) -> int:
    import torch

    return sum(isinstance(m, torch.nn.Linear) for m in module.modules())


def _layer_activations(hidden: int, kv: int, inter: int, gated: bool) -> int:
    """bf16 values one token leaves saved in one layer (see the module notes)."""
    return 6 * hidden + 2 * kv + (4 if gated else 2) * inter


def plan(config_path: str | Path, world_size: int, tokens: int, image_tokens: Optional[int] = None,
         gradient_checkpointing: bool = False, chunk_size: int = 1024, reference: bool = False) -> Plan:
    from transformers import AutoConfig

    from models.hf import empty_hf_model

    config = AutoConfig.from_pretrained(str(config_path))
    model = empty_hf_model(config)
    n = sum(p.numel() for p in model.parameters())
    units, root = _unit_sizes(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    kv = text.num_key_value_heads * head_dim
    vocab = text.vocab_size
    decoder = next(b for b in model.modules() if type(b).__name__ in model._no_split_modules
                   and hasattr(b, "mlp") and "Vision" not in type(b).__name__)
    per_tok = _layer_activations(h, kv, inter, _linear_count(decoder.mlp) >= 3)
    act_text = (tokens * h * layers + tokens * per_tok if gradient_checkpointing else tokens * per_tok * layers) * 2
    act_vision = 0
    vc = getattr(config, "vision_config", None)
    if vc is not None:
        image_tokens = tokens // 2 if image_tokens is None else image_tokens
        patches = image_tokens * getattr(vc, "spatial_merge_size", 2) ** 2
        block = next(b for b in model.modules() if "Vision" in type(b).__name__ and type(b).__name__ in model._no_split_modules)
        vper = _layer_activations(vc.hidden_size, vc.hidden_size, vc.intermediate_size, _linear_count(block.mlp) >= 3)
        depth = vc.depth
        act_vision = (patches * vc.hidden_size * depth + patches * vper if gradient_checkpointing
                      else patches * vper * depth) * 2
    loss_tokens = tokens // 2  # generated tokens of a long-video episode are far fewer; an upper bound
    rows = {
        "parameters (fp32, sharded)": 4 * n / world_size,
        "gradients (fp32, sharded)": 4 * n / world_size,
        "AdamW state (fp32, sharded)": 8 * n / world_size,
        "gathered units (2 x bf16 + fp32 grad of the largest)": (2 * 2 + 4) * max(units),
        "root unit gathered (bf16 + fp32 grad)": (2 + 4) * root if world_size > 1 else 0,
        f"activations, text ({tokens} tokens, bf16)": act_text,
        "activations, vision (bf16)": act_vision,
        "loss kernel ([chunk, V] x 2, dW, dh; fp32)": 4 * (2 * chunk_size * vocab + vocab * h + loss_tokens * h),
    }
    if reference:
        rows["reference policy (fp32, sharded)"] = 4 * n / world_size
    return Plan(Path(config_path).stem, world_size, n, rows)


def table(p: Plan, gpu_gib: float = 80.0) -> str:
    lines = [f"{p.name}: {p.params / 1e9:.2f}B parameters, world size {p.world_size}, per rank:",
             f"  {'':<56} {'GiB':>8}"]
    lines += [f"  {k:<56} {v / GIB:>8.1f}" for k, v in p.rows.items()]
    verdict = "fits" if p.total / GIB <= gpu_gib else "does NOT fit"
    lines.append(f"  {'total (estimate)':<56} {p.total / GIB:>8.1f}   {verdict} a {gpu_gib:g} GiB GPU")
    return "\n".join(lines)


def shipped_model_configs() -> list[Path]:
    """The public config.json files weft ships (configs/models/)."""
    return sorted((Path(__file__).resolve().parent.parent / "configs" / "models").glob("*.json"))


def main_plan(args: argparse.Namespace) -> int:
    """`weft plan`: prints the table, then a JSON line of the same numbers."""
    configs = [Path(args.model_config)] if args.model_config else shipped_model_configs()
    out = []
    for c in configs:
        p = plan(c, args.world_size, args.tokens, args.image_tokens, args.gradient_checkpointing, reference=args.reference)
        print(table(p, args.gpu_gib))
        out.append({"model": p.name, "world_size": p.world_size, "params": p.params,
                    "rows_gib": {k: round(v / GIB, 2) for k, v in p.rows.items()}, "total_gib": round(p.total / GIB, 2)})
    print(json.dumps(out))
    return 0
