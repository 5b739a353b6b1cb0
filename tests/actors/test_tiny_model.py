"""The tiny Qwen2.5-VL checkpoint: it loads in transformers, its tokenizer keeps the
action tags whole, its chat template shows tools and tool responses, and a random
model built this way does not collapse onto one token. (vLLM loads the same
checkpoint in tests/actors/test_engine.py.)"""

import json

import numpy as np
import pytest

from models.hf import banned_token_ids_of, expand_image_placeholders, image_token_count, load_hf_model, load_processor
from models.tiny import ACTION_TOKENS, SPECIAL_TOKENS, corpus_tools, make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_processor(tiny_dir)


def test_torchvision_imports_in_fresh_subprocesses(tmp_path):
    """vLLM inspects models and runs its engine core in new interpreters: the shim must reach them."""
    import os
    import subprocess
    import sys

    from models.shim import ensure_torchvision

    ensure_torchvision()
    code = "import torchvision.transforms.functional, transformers.image_utils; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert os.environ["PYTHONPATH"].split(os.pathsep).count(os.environ["PYTHONPATH"].split(os.pathsep)[0]) == 1
    ensure_torchvision()  # idempotent: the boot folder is not added twice
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0].endswith("_boot")


def test_checkpoint_is_a_standard_hf_dir(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["tie_word_embeddings"] is False
    assert (tiny_dir / "model.safetensors").is_file()
    assert (tiny_dir / "tokenizer.json").is_file()


def test_control_and_action_tags_are_single_tokens(processor):
    tok = processor.tokenizer
    for text in SPECIAL_TOKENS + ACTION_TOKENS:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == 1, (text, ids)
    assert 2500 <= len(tok) <= 4096
    turn = '<tool_call>\n{"name": "get_frame", "arguments": {"time": 12.5}}\n</tool_call><answer>B</answer><|im_end|>'
    ids = tok.encode(turn, add_special_tokens=False)
    assert tok.decode(ids) == turn  # byte-level BPE round-trips text exactly
    assert tok.convert_tokens_to_ids("</answer>") in ids


def test_chat_template_shows_tools_and_tool_responses(processor):
    messages = [
        {"role": "system", "content": "You answer questions about videos."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the dog doing?"}]},
        {"role": "assistant", "content": '<tool_call>\n{"name": "get_frame", "arguments": {"time": 3.5}}\n</tool_call>'},
        {"role": "tool", "content": [{"type": "text", "text": "Frame at 3.5s:"}, {"type": "image"}]},
        {"role": "tool", "content": "error: time 99.0 is past the end of the video (60.0 s)"},
    ]
    text = processor.tokenizer.apply_chat_template(messages, tools=corpus_tools(), tokenize=False,
                                                   add_generation_prompt=True)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou answer questions about videos.")
    tools_block = system.split("\n<tools>")[1].split("\n</tools>")[0]
    assert [json.loads(line) for line in tools_block.strip().splitlines()] == corpus_tools()
    # Both tool results sit in one user turn, each in its own <tool_response>, the image inside.
    tool_turn = text.split("<|im_start|>user\n<tool_response>")[1].split("<|im_end|>")[0]
    assert "Frame at 3.5s:<|vision_start|><|image_pad|><|vision_end|>" in tool_turn
    assert tool_turn.count("</tool_response>") == 2 and "error: time 99.0" in tool_turn
    assert text.endswith("<|im_start|>assistant\n")
    assert text.count("<|image_pad|>") == 2
    # Without tools: a default system prompt and no tools block.
    plain = processor.tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert plain.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n") and "<tools>" not in plain


def test_placeholder_expansion_matches_the_hf_processor(processor):
    rng = np.random.default_rng()
    images = [rng.integers(0, 256, (180, 320, 3), dtype=np.uint8), rng.integers(0, 256, (90, 160, 3), dtype=np.uint8),
              rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]
    assert [image_token_count(im, processor) for im in images] == [66, 18, 64]
    text = "<|im_start|>user\n" + "".join(f"t={i}<|vision_start|><|image_pad|><|vision_end|>" for i in range(3))
    ours = expand_image_placeholders(processor.tokenizer.encode(text), images, processor)
    hf = processor(text=[text], images=images, return_tensors="np")["input_ids"][0].tolist()
    assert ours == hf
    with pytest.raises(ValueError, match="already expanded"):
        expand_image_placeholders(ours, images, processor)
    with pytest.raises(ValueError, match="placeholders for 2 images"):
        expand_image_placeholders(processor.tokenizer.encode(text), images[:2], processor)


def test_transformers_loads_it_and_the_random_model_is_not_degenerate(tiny_dir, processor):
    import torch

    model = load_hf_model(tiny_dir, "float32")
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 2e7
    ids = processor.tokenizer.encode("<|im_start|>user\nwhat happens first?<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    entropy = -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum().item()
    assert entropy > 3.0, entropy  # an untied head with std 0.1: broad, not one-token
    torch.manual_seed(0)
    out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=True, min_new_tokens=40)
    assert len(set(out[0, len(ids):].tolist())) > 15
    with pytest.raises(ValueError, match="unknown dtype"):
        load_hf_model(tiny_dir, "float99")


def test_banned_ids_are_the_vision_placeholders(tiny_dir, processor):
    tok = processor.tokenizer
    want = sorted(tok.convert_tokens_to_ids(t) for t in
                  ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    assert banned_token_ids_of(tiny_dir) == want  # vocab == tokenizer length: no padding rows


def test_same_seed_same_checkpoint(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    a, b, c = (load_file(d / "model.safetensors") for d in (tiny_dir, again, other))
    assert (tiny_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert not np.array_equal(a["lm_head.weight"].numpy(), c["lm_head.weight"].numpy())
