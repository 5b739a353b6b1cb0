"""The learner: GRPO math (grpo.py), logprob kernels (kernels/), the fused loss entry point (loss.py).

Pure torch; imports neither Ray nor vLLM.
"""
