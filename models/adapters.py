"""Model families: everything that differs between Qwen2.5-VL and Qwen3-VL, one `Adapter` object each.

An adapter is a plain object (models/qwen2_5_vl.py, models/qwen3_vl.py); `adapter_for` picks
one by the checkpoint's `model_type`. What it holds:
* the HF class and the config's model types;
* the vision placeholder tokens (image pad, video pad, vision start / end) and the config keys
  naming their ids (the engine bans them, the learner masks them);
* `token_types(ids)`: the `mm_token_type_ids` transformers 5 needs to build the multimodal
  rotary positions (Qwen2.5-VL's M-RoPE, Qwen3-VL's interleaved M-RoPE: both take image = 1,
  video = 2; video timestamps are not used, weft sends frames as images);
* the names vLLM loads weights under, from the HF runtime names the learner publishes;
* how to build a tiny random model of the family offline (`tiny_config`, `tiny_processor`) and
  the chat template it ships with (real checkpoints bring their own template).
A new family is one more module with one more `Adapter` (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

PLACEHOLDER_CONFIG_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclass(frozen=True)
class Adapter:
    family: str  # what `make-tiny-model --family` and configs call it
    model_types: tuple[str, ...]  # the HF config's `model_type` values it covers
    hf_class: str  # the transformers class of a checkpoint
    tiny_config: Callable[[dict[str, int], int], Any]  # (special token ids, vocab size) -> HF config
    tiny_processor: Callable[[Any, str], Any]  # (tokenizer, chat template) -> HF processor
    chat_template: str  # the template a tiny model of this family ships with
    image_pad: str = "<|image_pad|>"
    video_pad: str = "<|video_pad|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    placeholder_config_keys: tuple[str, ...] = PLACEHOLDER_CONFIG_KEYS
    weight_prefixes: dict[str, str] = field(default_factory=dict)  # HF runtime prefix -> the engine's (identity if empty)

    @property
    def placeholder_tokens(self) -> tuple[str, ...]:
        return (self.image_pad, self.video_pad, self.vision_start, self.vision_end)

    def token_types(self, ids: Any, config: Any) -> Any:
        """`mm_token_type_ids` of token ids `[B, T]`: 1 on image tokens, 2 on video tokens, 0 elsewhere."""
        types = (ids == config.image_token_id).int()
        video = getattr(config, "video_token_id", None)
        return types if video is None else types + 2 * (ids == video).int()

    def engine_weight_name(self, name: str) -> str:
        """The name the rollout engine loads an HF runtime-named tensor under."""
        for old, new in self.weight_prefixes.items():
            if name.startswith(old):
                return new + name[len(old):]
        return name


def tiny_vl_config(config_class: Any, ids: dict[str, int], vocab: int, text: dict, vision: dict) -> Any:
    """An HF config of a Qwen-VL-style family for a tiny model: the tokenizer's special ids wired in, the
    embeddings untied (a tied random model repeats one token forever)."""
    return config_class(
        text_config={**text, "vocab_size": vocab, "bos_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)


def families() -> dict[str, Adapter]:
    """Every family weft knows, by name."""
    from models.qwen2_5_vl import ADAPTER as QWEN2_5_VL
    from models.qwen3_vl import ADAPTER as QWEN3_VL

    return {a.family: a for a in (QWEN2_5_VL, QWEN3_VL)}


def adapter_for(config: Any) -> Optional[Adapter]:
    """The adapter of an HF config (or model type); None for a text-only model (no vision to adapt)."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", "")
    for a in families().values():
        if model_type in a.model_types:
            return a
    if not isinstance(config, str) and getattr(config, "image_token_id", None) is not None:
        raise ValueError(f"no weft adapter for the vision-language model type {model_type!r}; the families are "
                         f"{sorted(families())} (a new one is one module in models/, see docs/extending.md)")
    return None
