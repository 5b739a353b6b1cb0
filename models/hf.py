"""Loading and running standard HF vision-language models, shared by the rollout side and the learner.

Owns `load_hf_model` / `load_processor` (assume nothing beyond a standard HF
directory, so the same code loads the tiny model and Qwen2.5-VL-7B-Instruct),
the banned-token rule (`banned_token_ids`: vision placeholders and padding rows,
which the engine masks before sampling and the learner before its log-softmax),
image placeholder expansion (`expand_image_placeholders`: one `<|image_pad|>`
per image as the chat template renders it -> the image's full token run), and
the reference recomputation of token logprobs with a plain HF forward
(`hf_inputs`, `hf_token_logprobs`), which tests compare the engine and the
trainer against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from models.shim import ensure_torchvision

IMAGE_PAD = "<|image_pad|>"  # the Qwen-VL families' image placeholder (a processor names its own: `image_pad_of`)


def image_pad_of(processor: Any) -> str:
    """The image placeholder token of a processor's family."""
    return getattr(processor, "image_token", None) or IMAGE_PAD


def image_token_count(image: np.ndarray | tuple[int, int], processor: Any) -> int:
    """`<|image_pad|>` tokens one image becomes: (h/14)*(w/14)/4 after the processor's resize.

    `image` is an HxWx3 array or an (height, width) pair.
    """
    height, width = (image.shape[0], image.shape[1]) if isinstance(image, np.ndarray) else image
    ip = processor.image_processor
    return int(ip.get_number_of_image_patches(int(height), int(width), {})) // int(ip.merge_size) ** 2


def expand_image_placeholders(token_ids: Sequence[int], images: Sequence[np.ndarray], processor: Any) -> list[int]:
    """Replace the i-th single `<|image_pad|>` (as the chat template renders it) by image i's full run."""
    pad = processor.tokenizer.convert_tokens_to_ids(image_pad_of(processor))
    runs = pad_runs(token_ids, pad)
    if len(runs) != len(images):
        raise ValueError(f"{len(runs)} {image_pad_of(processor)} placeholders for {len(images)} images")
    if any(length != 1 for _, length in runs):
        raise ValueError(f"placeholders are already expanded (run lengths {[n for _, n in runs]})")
    out: list[int] = []
    prev = 0
    for (start, _), image in zip(runs, images):
        out.extend(int(t) for t in token_ids[prev:start])
        out.extend([pad] * image_token_count(check_image(image), processor))
        prev = start + 1
    out.extend(int(t) for t in token_ids[prev:])
    return out


def check_image(image: Any) -> np.ndarray:
    """The image as a uint8 HxWx3 array, or a ValueError saying what is wrong."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"empty image {image.shape}")
    return image


def pad_runs(token_ids: Sequence[int], pad: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `pad` in `token_ids`."""
    ids = np.asarray(token_ids)
    if ids.size == 0:
        return []
    is_pad = np.concatenate([[False], ids == pad, [False]])
    edges = np.flatnonzero(is_pad[1:] != is_pad[:-1])  # alternating run starts and ends
    return [(int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2])]


def load_processor(model_dir: str | Path) -> Any:
    """The HF processor (tokenizer + image/video processors) of a standard HF model directory."""
    ensure_torchvision()
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_dir))


def load_hf_model(model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> Any:
    """The HF model of a standard HF directory, in eval mode: a vision-language model
    (AutoModelForImageTextToText) when its config is one, else a text-only causal LM."""
    ensure_torchvision()
    import torch
    from transformers import AutoConfig

    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    config = AutoConfig.from_pretrained(str(model_dir))
    model = hf_model_class(config).from_pretrained(str(model_dir), dtype=torch_dtype)
    return model.to(device).eval()


def has_weights(model_dir: str | Path) -> bool:
    return any(Path(model_dir).glob("*.safetensors")) or any(Path(model_dir).glob("*.bin"))


def load_or_init_hf_model(model_dir: str | Path, device: str = "cpu") -> Any:
    """`load_hf_model` in fp32, or, for a directory with a config and no weights (a checkpoint's model/,
    whose weights are in its DCP shards), the model initialised from the config."""
    if has_weights(model_dir):
        return load_hf_model(model_dir, "float32", device)
    ensure_torchvision()
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    return hf_model_class(config).from_config(config, dtype=torch.float32).to(device).eval()


def hf_model_class(config: Any) -> Any:
    """The Auto class of a config: vision-language (AutoModelForImageTextToText) or a text-only causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return AutoModelForImageTextToText if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES \
        else AutoModelForCausalLM


def empty_hf_model(source: str | Path | Any) -> Any:
    """The model of an HF directory (or config) built on the meta device: shapes, no storage, no weights
    read. What the learner's ranks other than 0 shard before rank 0's weights are broadcast into
    them, and what `weft plan` sizes."""
    ensure_torchvision()
    import torch
    from transformers import AutoConfig

    config = source if hasattr(source, "model_type") else AutoConfig.from_pretrained(str(source))
    with torch.device("meta"):
        return hf_model_class(config).from_config(config, dtype=torch.float32)




def banned_token_ids(hf_config: Any, tokenizer_len: int) -> list[int]:
    """Ids the policy must never sample: vision placeholders, and rows past the tokenizer.

    The engine masks them to -inf before temperature (`actors.vllm_ext`), so its
    processed logprobs are normalised over the rest; the learner must mask the
    same ids before its log-softmax to compute the same distribution.
    """
    from models.adapters import PLACEHOLDER_CONFIG_KEYS, adapter_for

    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    vocab = int(getattr(text, "vocab_size", None) or hf_config.vocab_size)
    adapter = adapter_for(hf_config)
    keys = adapter.placeholder_config_keys if adapter is not None else PLACEHOLDER_CONFIG_KEYS
    ids = {int(getattr(hf_config, k)) for k in keys if getattr(hf_config, k, None) is not None}
    ids.update(range(tokenizer_len, vocab))  # padding rows: no token, never a valid sample
    return sorted(i for i in ids if 0 <= i < vocab)


def banned_token_ids_of(model_dir: str | Path) -> list[int]:
    """`banned_token_ids` of a standard HF model directory (config + tokenizer)."""
    ensure_torchvision()
    from transformers import AutoConfig, AutoTokenizer

    return banned_token_ids(AutoConfig.from_pretrained(str(model_dir)), len(AutoTokenizer.from_pretrained(str(model_dir))))


def hf_inputs(model: Any, processor: Any, token_ids: list[int], images: list[Any]) -> dict[str, Any]:
    """Keyword inputs of an HF Qwen-VL forward for token ids with expanded image runs and their images."""
    import torch

    ids = torch.tensor([token_ids], dtype=torch.long)
    inputs: dict[str, Any] = {"input_ids": ids}
    if images:
        vision = processor.image_processor(images=list(images), return_tensors="pt")
        # transformers 5 builds the 3-D (M-RoPE) positions only when told which tokens are image
        # tokens; without mm_token_type_ids it silently falls back to 1-D positions.
        token_types = token_types_fn(model.config)(ids)
        inputs.update(pixel_values=vision["pixel_values"].to(model.dtype), image_grid_thw=vision["image_grid_thw"],
                      mm_token_type_ids=token_types)
    return inputs


def token_types_fn(config: Any) -> Any:
    """ids `[B, T]` -> the `mm_token_type_ids` the model's family builds positions from (its adapter's)."""
    from models.adapters import adapter_for

    adapter = adapter_for(config)
    if adapter is None:
        raise ValueError(f"{getattr(config, 'model_type', '?')} has no vision adapter: it takes no images")
    return lambda ids: adapter.token_types(ids, config)


def hf_token_logprobs(model: Any, processor: Any, token_ids: list[int], images: list[Any], start: int,
                      temperature: float = 1.0, banned: Optional[list[int]] = None) -> Any:
    """Reference recomputation: logprob of token_ids[start:] under an HF model, as the engine reports them.

    `token_ids` hold expanded image runs; `images` are the uint8 HxWx3 arrays in
    order. Logits get `banned` ids masked to -inf and are divided by the
    temperature before the log-softmax (the engine's processed logprobs).
    Returns float32[len(token_ids) - start]. One full forward: for tests and checks.
    """
    import torch

    inputs = hf_inputs(model, processor, token_ids, images)
    with torch.no_grad():
        logits = model(**inputs).logits[0, start - 1:-1].float()
    if banned:
        logits[:, banned] = float("-inf")
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, inputs["input_ids"][0, start:, None])[:, 0].numpy().astype("float32")


# Weight buckets for in-place reloads: vLLM finalises a layer once all its parts arrived,
# so a layer split over two loads would be finalised half-loaded. Shared by the learner's
# publishers and the engine's loader.


def layer_key(name: str) -> str:
    """The layer a tensor belongs to: its name up to the first numeric part ("model.language_model.layers.3")."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


def layer_buckets(named: Iterable[tuple[str, Any]], bucket_bytes: int) -> Iterator[list[tuple[str, Any]]]:
    """Consecutive tensors in buckets of at least `bucket_bytes` (the last may be smaller), cut only between layers."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[tuple[str, Any]] = []
    size, key = 0, None
    for name, t in named:
        k = layer_key(name)
        if bucket and k != key and size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        key = k
    if bucket:
        yield bucket
