"""The Qwen2.5-VL family: its adapter (models/adapters.py) and how to build a tiny random one offline.

Qwen2.5-VL: a Qwen2.5 decoder with M-RoPE (temporal, height, width sections of the rotary
dimensions), and a windowed ViT with 14-pixel patches merged 2 x 2 into one image token.
"""

from __future__ import annotations

from typing import Any

from models.adapters import Adapter, tiny_vl_config

# Qwen2.5's tool-calling chat template (system <tools> block, tool results as a user turn of
# <tool_response> blocks) merged with Qwen2.5-VL's multimodal content parts. One `<|image_pad|>`
# per image: the processor (or `models.hf.expand_image_placeholders`) expands it to the image's run.
CHAT_TEMPLATE = r"""{%- macro render(content) -%}
{%- if content is string -%}{{- content -}}
{%- else -%}{%- for part in content -%}
{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}<|vision_start|><|image_pad|><|vision_end|>
{%- elif part['type'] == 'video' or 'video' in part -%}<|vision_start|><|video_pad|><|vision_end|>
{%- elif 'text' in part -%}{{- part['text'] -}}
{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if messages[0]['role'] == 'system' -%}{{- render(messages[0]['content']) -}}{%- else -%}{{- 'You are a helpful assistant.' -}}{%- endif -%}
{{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
{%- for tool in tools -%}{{- '\n' -}}{{- tool | tojson -}}{%- endfor -%}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif messages[0]['role'] != 'system' -%}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' and loop.first and tools -%}
{%- elif message['role'] == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' -}}{{- render(message['content']) -}}{{- '\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- elif message['role'] == 'assistant' and message['tool_calls'] -%}
{{- '<|im_start|>assistant' -}}
{%- if message['content'] -%}{{- '\n' -}}{{- render(message['content']) -}}{%- endif -%}
{%- for tool_call in message['tool_calls'] -%}
{%- if tool_call['function'] is defined -%}{%- set tool_call = tool_call['function'] -%}{%- endif -%}
{{- '\n<tool_call>\n{"name": "' -}}{{- tool_call['name'] -}}{{- '", "arguments": ' -}}
{%- if tool_call['arguments'] is string -%}{{- tool_call['arguments'] -}}{%- else -%}{{- tool_call['arguments'] | tojson -}}{%- endif -%}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + message['role'] + '\n' -}}{{- render(message['content']) -}}{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""

# Shapes of the tiny model. head_dim 32 -> mrope sections sum to 16.
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=8192, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]})
VISION = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1], tokens_per_second=2)
# 320x180 -> 308x168 after resize -> 66 tokens; 160x90 -> 18; 224x224 -> 64.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 320 * 320


def tiny_config(ids: dict[str, int], vocab: int) -> Any:
    from transformers import Qwen2_5_VLConfig

    return tiny_vl_config(Qwen2_5_VLConfig, ids, vocab, TEXT, VISION)


def tiny_processor(tokenizer: Any, chat_template: str) -> Any:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer, chat_template=chat_template)


ADAPTER = Adapter(family="qwen2_5_vl", model_types=("qwen2_5_vl",), hf_class="Qwen2_5_VLForConditionalGeneration",
                  tiny_config=tiny_config, tiny_processor=tiny_processor, chat_template=CHAT_TEMPLATE)
