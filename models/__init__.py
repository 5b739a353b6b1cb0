"""The model side shared by the rollout workers and the learner (neither imports the other).

`shim` (torchvision on a CPU-only torch, for every process that loads
transformers or vLLM), `hf` (loading standard HF checkpoints, banned tokens,
image placeholder expansion, reference logprobs), `tiny` (the offline tiny
Qwen2.5-VL, tokenizer and chat template), `chat` (rendering prompts and
observations token-in/token-out through the chat template). Imports protos,
configs, env.types and third-party libraries only; importing the package imports
nothing heavy.
"""
