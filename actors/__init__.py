"""Ray-facing roles of weft: the vLLM rollout engine, the agent loop, and the actor wrappers.

`compat` (vLLM's CPU/GPU differences), `engine` (vLLM AsyncLLM wrapper),
`vllm_ext` (plug-ins that run inside vLLM's engine process). The model loaders,
tiny model, torchvision shim and chat renderer live in `models/`, shared with
the learner. Importing the package imports nothing heavy.
"""
