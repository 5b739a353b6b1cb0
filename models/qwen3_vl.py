"""The Qwen3-VL family (dense): its adapter (models/adapters.py) and a tiny random one built offline.

Qwen3-VL: a Qwen3 decoder (QK-norm) with *interleaved* M-RoPE, a ViT with 16-pixel patches merged
2 x 2, learned position embeddings interpolated to the image grid, and DeepStack (features of
some vision blocks are added to the first decoder layers' hidden states). For video it puts
timestamps between frames in the text; weft sends frames as images with their times written
in the observation, so images are all it needs. Its placeholders, the mm_token_type_ids that
positions are built from, and the weight names vLLM loads are the same as Qwen2.5-VL's.
The tiny one ships the Qwen2.5 tool template (models/qwen2_5_vl.py); a real checkpoint brings its own.
"""

from __future__ import annotations

from typing import Any

from models.adapters import Adapter, tiny_vl_config
from models.qwen2_5_vl import CHAT_TEMPLATE, MAX_PIXELS

# head_dim 32 -> interleaved mrope sections sum to 16. deepstack from vision block 0 of 2.
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, max_position_embeddings=8192, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5],
                             "mrope_interleaved": True})
VISION = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256, deepstack_visual_indexes=[0])
MIN_PIXELS = 32 * 32 * 4  # 16-pixel patches merged 2 x 2: a 32-pixel grid


def tiny_config(ids: dict[str, int], vocab: int) -> Any:
    from transformers import Qwen3VLConfig

    return tiny_vl_config(Qwen3VLConfig, ids, vocab, TEXT, VISION)


def tiny_processor(tokenizer: Any, chat_template: str) -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2,
                                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
        video_processor=Qwen3VLVideoProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer, chat_template=chat_template)


ADAPTER = Adapter(family="qwen3_vl", model_types=("qwen3_vl",), hf_class="Qwen3VLForConditionalGeneration",
                  tiny_config=tiny_config, tiny_processor=tiny_processor, chat_template=CHAT_TEMPLATE)
