"""Tiny random vision-language checkpoints built offline, for tests and CPU runs.

Owns `make_tiny_model(out, seed, family)` (a tokenizer trained on generated local text, the
family's chat template that shows tools, a randomly initialised few-million-parameter model of
the family and its processor, saved as a standard HF directory; the shapes live in the family's
module, models/qwen2_5_vl.py or models/qwen3_vl.py) and `build_tokenizer`.
The loaders that work on any standard HF directory (tiny or Qwen2.5-VL-7B) are
in `models.hf`. No downloads anywhere.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterator

from models.qwen2_5_vl import CHAT_TEMPLATE as QWEN2_5_VL_TEMPLATE
from models.shim import ensure_torchvision

# Qwen2.5's control tokens (special: hidden when decoding with skip_special_tokens).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Action-format tags: single tokens so stop conditions and the parser see clean
# boundaries, but not "special", so decoding keeps them (as Qwen2.5 does).
ACTION_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<answer>", "</answer>",
                 "<think>", "</think>"]
CHAT_TEMPLATE = QWEN2_5_VL_TEMPLATE  # re-exported: the template of the default family
VOCAB_SIZE = 4096
LM_HEAD_STD = 0.1  # a larger head keeps a random model from repeating one token (CPU_STACK.md)


def corpus_tools() -> list[dict]:
    """The built-in tools as the chat template shows them (env/tools.py's own schemas, so the tokenizer
    learns the merges of exactly what the model will read)."""
    from configs.schema import EnvConfig
    from env.tools import builtin_tools

    return [t.schema for t in builtin_tools(EnvConfig()).values()]


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
    for tool in corpus_tools():
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


def build_tokenizer(seed: int = 0, vocab_size: int = VOCAB_SIZE, chat_template: str = CHAT_TEMPLATE) -> Any:
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
                                   chat_template=chat_template, model_max_length=8192,
                                   clean_up_tokenization_spaces=False)


def tiny_processor(seed: int = 0, family: str = "qwen2_5_vl") -> Any:
    """The processor (tokenizer trained on the spot + image processor) a tiny model of `family` ships with,
    without the model: what a scripted policy needs to play episodes token-in/token-out (`weft eval --policy`)."""
    ensure_torchvision()
    from models.adapters import families

    adapter = families()[family]
    return adapter.tiny_processor(build_tokenizer(seed, chat_template=adapter.chat_template), adapter.chat_template)


def make_tiny_model(out_dir: str | Path, seed: int = 0, family: str = "qwen2_5_vl") -> Path:
    """Write a tiny random model of `family` (config, safetensors, tokenizer, processor) to `out_dir`."""
    ensure_torchvision()
    import torch
    import transformers
    from transformers import GenerationConfig

    from models.adapters import families

    if family not in families():
        raise ValueError(f"unknown family {family!r}; the families are {sorted(families())}")
    adapter = families()[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed, chat_template=adapter.chat_template)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = adapter.tiny_config(ids, len(tokenizer))
    torch.manual_seed(seed)
    model = getattr(transformers, adapter.hf_class)(config).to(torch.float32).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        head = model.get_output_embeddings().weight
        head.copy_(torch.randn(head.shape, generator=gen) * LM_HEAD_STD)
    model.generation_config = GenerationConfig(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                                               pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
    model.save_pretrained(out)
    adapter.tiny_processor(tokenizer, adapter.chat_template).save_pretrained(out)
    tokenizer.save_pretrained(out)  # the tokenizer's own copy of the template, for vLLM and AutoTokenizer
    return out
