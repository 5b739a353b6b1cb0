"""A tiny random Qwen2.5-VL checkpoint built offline, for tests and CPU runs.

Owns `make_tiny_model` (tokenizer trained on generated local text, a
Qwen2.5-VL-style chat template that shows tools, a randomly initialised
few-million-parameter `Qwen2_5_VLForConditionalGeneration` and its processor,
saved as a standard HF directory), `build_tokenizer` and `CHAT_TEMPLATE`.
The loaders that work on any standard HF directory (tiny or Qwen2.5-VL-7B) are
in `models.hf`. No downloads anywhere.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterator

from models.shim import ensure_torchvision

# Qwen2.5's control tokens (special: hidden when decoding with skip_special_tokens).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Action-format tags: single tokens so stop conditions and the parser see clean
# boundaries, but not "special", so decoding keeps them (as Qwen2.5 does).
ACTION_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<answer>", "</answer>",
                 "<think>", "</think>"]
# Tokens the policy must never sample: a sampled placeholder would break the
# learner's recomputation ("image features and image tokens do not match").
PLACEHOLDER_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]

# Qwen2.5's tool-calling chat template (system <tools> block, tool results as a
# user turn of <tool_response> blocks) merged with Qwen2.5-VL's multimodal
# content parts. One `<|image_pad|>` per image: the processor (or
# `models.hf.expand_image_placeholders`) expands it to the image's token run.
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
TEXT_CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]})
VISION_CONFIG = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128,
                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                     fullatt_block_indexes=[1], tokens_per_second=2)
# 320x180 -> 308x168 after resize -> 66 tokens; 160x90 -> 18; 224x224 -> 64.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 320 * 320
VOCAB_SIZE = 4096
LM_HEAD_STD = 0.1  # a larger head keeps a random model from repeating one token (CPU_STACK.md)

# The four tools as the chat template shows them. Only used to give the
# tokenizer the merges those schemas need; the env owns the real schemas.
CORPUS_TOOLS = [
    {"type": "function", "function": {"name": "temporal_zoom", "description": "Frames sampled uniformly in a time window of the video.",
     "parameters": {"type": "object", "properties": {"start": {"type": "number", "description": "Start time in seconds."},
                    "end": {"type": "number", "description": "End time in seconds."},
                    "num_frames": {"type": "integer", "description": "How many frames, at most 16."}}, "required": ["start", "end"]}}},
    {"type": "function", "function": {"name": "spatial_zoom", "description": "A crop of one frame at higher resolution.",
     "parameters": {"type": "object", "properties": {"time": {"type": "number", "description": "Time in seconds."},
                    "bbox": {"type": "array", "items": {"type": "number"}, "description": "Normalised [x1, y1, x2, y2]."}},
                    "required": ["time", "bbox"]}}},
    {"type": "function", "function": {"name": "temporal_search", "description": "The moments whose captions best match a query.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "What to look for."},
                    "top_k": {"type": "integer", "description": "How many moments to return."}}, "required": ["query"]}}},
    {"type": "function", "function": {"name": "get_frame", "description": "One frame of the video.",
     "parameters": {"type": "object", "properties": {"time": {"type": "number", "description": "Time in seconds."}},
                    "required": ["time"]}}},
]
_WORDS = ("the a an of to in on at for with from by and or but not is are was were be been has have had do does did "
          "what which who where when why how many much first last before after during while then again video frame "
          "frames clip scene person man woman child dog cat car bus bike ball table chair door window kitchen street "
          "room park field water tree sky red blue green yellow black white left right top bottom middle center "
          "holds picks puts opens closes walks runs sits stands jumps throws catches cooks eats drinks talks looks "
          "enters leaves turns moves shows appears happens begins ends time second seconds minute minutes start end "
          "answer question option options correct because so i need look closer zoom search find check see the "
          "count number object action event color shape size near far inside outside above below between").split()


def corpus(seed: int = 0, n: int = 4000) -> Iterator[str]:
    """Local text in the shapes the model will read and write: chat turns, tool calls, answers, numbers."""
    rng = random.Random(seed)
    for tool in CORPUS_TOOLS:
        yield json.dumps(tool)
    for _ in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 20)))
        t0 = round(rng.uniform(0, 600), rng.choice([0, 1, 2]))
        t1 = round(t0 + rng.uniform(1, 60), rng.choice([0, 1, 2]))
        call = rng.choice([
            {"name": "temporal_zoom", "arguments": {"start": t0, "end": t1, "num_frames": rng.randint(1, 16)}},
            {"name": "spatial_zoom", "arguments": {"time": t0, "bbox": [round(rng.random(), 2) for _ in range(4)]}},
            {"name": "temporal_search", "arguments": {"query": words[:40], "top_k": rng.randint(1, 10)}},
            {"name": "get_frame", "arguments": {"time": t0}},
        ])
        letter = rng.choice("ABCDE")
        yield rng.choice([
            f"<|im_start|>user\n{words.capitalize()}?\nA. {rng.choice(_WORDS)}\nB. {rng.choice(_WORDS)}<|im_end|>\n",
            f"<|im_start|>assistant\n<think>\n{words}.\n</think>\n<tool_call>\n{json.dumps(call)}\n</tool_call><|im_end|>\n",
            f"<|im_start|>user\n<tool_response>\nFrames at {t0:.1f}s, {t1:.1f}s: <|vision_start|><|image_pad|><|vision_end|>\n</tool_response><|im_end|>\n",
            f"<|im_start|>assistant\n<answer>{letter}</answer><|im_end|>\n",
            f"{words}. {rng.randint(0, 100000)} {t0} {t1} {rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
            json.dumps(call),
        ])


def build_tokenizer(seed: int = 0, vocab_size: int = VOCAB_SIZE) -> Any:
    """Byte-level BPE trained on `corpus`, with Qwen's special tokens and the chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(ACTION_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ACTION_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=TEXT_CONFIG["max_position_embeddings"],
                                   clean_up_tokenization_spaces=False)


def make_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL (config, safetensors, tokenizer, processor) to `out_dir`."""
    ensure_torchvision()
    import torch
    from transformers import (GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={**TEXT_CONFIG, "vocab_size": len(tokenizer), "bos_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        vision_config=VISION_CONFIG, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        head = model.get_output_embeddings().weight
        head.copy_(torch.randn(head.shape, generator=gen) * LM_HEAD_STD)
    model.generation_config = GenerationConfig(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                                               pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
    model.save_pretrained(out)
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)  # the tokenizer's own copy of the template, for vLLM and AutoTokenizer
    return out
