"""Rollout benchmark: what the agent loop costs over bare vLLM, and what prefix sharing saves.

(1) Agent loop vs bare vLLM, on one engine in one run. The agent side is the rollout
    worker as it runs (`RolloutCore.run`: K groups of G episodes, `concurrent_groups` at a
    time, real decord in a LocalEnv, chat rendering) over an engine wrapped in a
    recorder that logs every call (prompt ids, images, tokens generated). The bare side
    replays exactly those calls on the same engine: same prompts and images, the same number
    of tokens forced (`ignore_stop=True, max_tokens=n`), the same concurrency (groups
    `concurrent_groups` at a time, a group's episodes at once, an episode's calls in order),
    and nothing else: no env, no rendering. In a later turn's prompt the agent's previous
    turn is replaced by the replay's own tokens (same length), so both reuse their decoded KV
    through the prefix cache alike. Both start with empty prefix and encoder caches
    and generate the same number of tokens, so ratio = agent tok/s / bare tok/s, and
    overhead = 1 - ratio (goal <= 10%). After --warmup untimed pairs, --reps pairs (agent, then
    its replay); medians. The engine's idle time before the first call (env resets decoding
    the overviews) is reported apart, with the gaps between an episode's turns.
(2) Prefill sharing. The G episodes of a group share one prompt and one overview, so vLLM's
    prefix cache (and with it the encoder, whose outputs are only needed for uncached image
    positions) should pay their first-turn prefill once, not G times. A long-video-like first
    prompt (--prefill-frames overview frames, real decord) is prefilled G times at once
    (max_tokens=1) as the group does, against G prompts of the same length and image count
    that share no prefix (one early token changed, one pixel of every image changed so the
    images' content hashes differ), against one prompt alone, and against the G copies with
    the prompt already cached (the per-request floor: the frontend's image preprocessing,
    scheduling, one decode step). Cold caches otherwise;
    medians of wall time, and the engine's own counts (a vLLM stat logger): prefix-cache hits and
    how many images the vision encoder ran on.

With a random tiny model (the default) the policy never writes a valid tool call, so the
env's per-turn work is parsing and an error observation; the reset (overview decode) is
real. A trained checkpoint (--model) exercises the tools. The machine's cores may be
shared: the load average is printed with the results.

Run: .venv/bin/python bench/rollout.py [--model DIR --data tasks.jsonl] [--groups 2 --group-size 8
         --concurrent-groups 2 --reps 3 --warmup 1 --prefill-frames 32 --prefill-size 320x180
         --prefill-reps 3 --skip agent|prefill]
Prints human-readable lines, then a final JSON line with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import numpy as np  # noqa: E402


@dataclass
class Call:
    """One engine call the agent loop made, enough to replay it."""

    group: str
    episode: str
    turn: int
    prompt_ids: list[int]
    images: list[np.ndarray]
    generated: int  # tokens the engine returned
    submitted: float  # perf_counter() when the loop called generate()
    returned: float  # ... and when generate() returned


class RecordingEngine:
    """Forwards everything to the engine; logs each generate() (the agent loop mutates its lists: copy)."""

    def __init__(self, engine: Any):
        self._engine = engine
        self.calls: list[Call] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, prompt_token_ids: Sequence[int], images: Sequence[np.ndarray] = (),
                       sampling: Any = None, request_id: Optional[str] = None) -> Any:
        t0 = time.perf_counter()
        ids, ims = list(prompt_token_ids), list(images)
        out = await self._engine.generate(ids, ims, sampling, request_id=request_id)
        # The agent loop names requests f"{group_id}-{episode index}-{turn}".
        episode, turn = (request_id or "?-0").rsplit("-", 1)
        self.calls.append(Call(episode.rsplit("-", 1)[0], episode, int(turn), ids, ims, len(out.token_ids),
                               t0, time.perf_counter()))
        return out


def gaps(calls: list[Call], start: float) -> dict[str, float]:
    """Where the engine waited on the loop: episode start -> first call (env reset, overview decode,
    rendering), and a call's return -> the episode's next call (env step, rendering). Medians and means."""
    by_ep: dict[str, list[Call]] = {}
    for c in calls:
        by_ep.setdefault(c.episode, []).append(c)
    first = [min(c.submitted for c in cs) - start for cs in by_ep.values()]
    between = [b.submitted - a.returned for cs in by_ep.values()
               for a, b in zip(sorted(cs, key=lambda c: c.turn), sorted(cs, key=lambda c: c.turn)[1:])]
    stat = lambda xs, f: float(f(xs)) if xs else 0.0  # noqa: E731
    return {"first_call_s_median": stat(first, np.median), "turn_gap_ms_median": 1e3 * stat(between, np.median),
            "turn_gap_ms_mean": 1e3 * stat(between, np.mean), "turn_gap_ms_max": 1e3 * stat(between, np.max)}


# ------------------------------------------------------------------ the engine's counters

STATS: Counter = Counter()  # totals since start, filled by the stat logger below (in this process)


def stats_logger() -> Any:
    """A vLLM stat logger that adds up, each engine step: prefix-cache queries and hits (tokens),
    encoder inputs (images) and their output tokens, prompt and generated tokens, and the
    finished requests' prefill time (scheduled -> first token). Counts go to STATS."""
    from actors.compat import ensure_torchvision

    ensure_torchvision()  # before vLLM's first import (CPU_STACK.md)
    from vllm.v1.metrics.loggers import StatLoggerBase

    class EngineCounters(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                STATS["prefix_cache_queries"] += scheduler_stats.prefix_cache_stats.queries
                STATS["prefix_cache_hits"] += scheduler_stats.prefix_cache_stats.hits
                d = scheduler_stats.iteration_details  # needs enable_logging_iteration_details
                if d is not None:
                    STATS["encoder_inputs"] += d.num_encoder_inputs
                    STATS["encoder_tokens"] += d.num_encoder_output_tokens
            if iteration_stats is not None:
                STATS["prompt_tokens"] += iteration_stats.num_prompt_tokens
                STATS["generation_tokens"] += iteration_stats.num_generation_tokens
                STATS["prefill_time_s"] += sum(f.prefill_time for f in iteration_stats.finished_requests)

        def log_engine_initialized(self) -> None:
            pass

    return EngineCounters


def vllm_counters() -> dict[str, float]:
    return {k: float(v) for k, v in STATS.items()}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    if d.get("prefix_cache_queries"):
        d["prefix_cache_hit_rate"] = d["prefix_cache_hits"] / d["prefix_cache_queries"]
    return d


async def cold_caches(engine: Any) -> None:
    """Empty prefix and encoder caches, so each measured phase starts alike."""
    if not await engine.llm.reset_prefix_cache():
        raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?)")
    await engine.llm.reset_encoder_cache()


# ------------------------------------------------------------------ (1) agent vs bare


async def agent_run(core: Any, engine: Any, groups: int) -> tuple[list[Call], float, dict[str, Any]]:
    """K groups through the rollout worker over a recording engine: (calls, wall seconds, summary)."""
    from actors.rollout_worker import QueueSink

    core.env.decoder.clear()  # every run decodes its videos cold, as new tasks would be
    await cold_caches(engine)
    rec = RecordingEngine(engine)
    core.engine = rec
    sink = QueueSink()
    before = vllm_counters()
    t0 = time.perf_counter()
    await core.run(groups, sink)
    wall = time.perf_counter() - t0
    trajs = [t for g in sink.drain() for t in g.trajectories]
    summary: dict[str, Any] = {"episodes": len(trajs), "status": dict(Counter(t.status.value for t in trajs))}
    mean = lambda k: float(np.mean([t.metrics.get(k, 0.0) for t in trajs])) if trajs else 0.0  # noqa: E731
    summary.update(turns_mean=mean("turns"), tool_calls_mean=mean("tool_calls"), frames_mean=mean("frames"),
                   env_s_mean=mean("env_s"), engine_s_mean=mean("engine_s"), episode_s_mean=mean("episode_s"),
                   calls=len(rec.calls), gaps=gaps(rec.calls, t0), vllm=delta(vllm_counters(), before))
    return rec.calls, wall, summary


def next_prompt(prev: Optional[Call], call: Call, prev_prompt: Optional[list[int]], prev_out: Any) -> list[int]:
    """The replay's prompt for `call`: the recorded one with the agent's previous turn swapped for the
    replay's own (same length), so the replay reuses its decoded KV from the prefix cache as the agent
    loop did. A call that does not extend its predecessor is replayed as recorded."""
    if prev is None or prev_out is None:
        return call.prompt_ids
    cut = len(prev.prompt_ids) + prev.generated
    if len(call.prompt_ids) < cut or call.prompt_ids[:len(prev.prompt_ids)] != prev.prompt_ids:
        return call.prompt_ids
    return prev_prompt + [int(t) for t in prev_out.token_ids] + call.prompt_ids[cut:]


async def bare_run(engine: Any, calls: list[Call], concurrent_groups: int, temperature: float) -> tuple[float, int, dict]:
    """Replay the calls with nothing around them: (wall seconds, tokens generated, {gaps, vllm counters})."""
    from actors.engine import SamplingConfig

    episodes: dict[str, dict[str, list[Call]]] = {}
    for c in calls:
        if c.generated > 0:  # an aborted call generated nothing: nothing to replay
            episodes.setdefault(c.group, {}).setdefault(c.episode, []).append(c)
    sem = asyncio.Semaphore(concurrent_groups)
    rec = RecordingEngine(engine)  # the same bookkeeping as the agent side, for the same gaps

    async def episode(ep_calls: list[Call]) -> int:
        n, prev, prompt, out = 0, None, None, None
        for c in sorted(ep_calls, key=lambda c: c.turn):
            cfg = SamplingConfig(temperature=temperature, max_tokens=c.generated, ignore_stop=True)
            prompt = next_prompt(prev, c, prompt, out)
            out = await rec.generate(prompt, c.images, cfg, f"{c.episode}-{c.turn}")
            n, prev = n + len(out.token_ids), c
        return n

    async def group(eps: dict[str, list[Call]]) -> int:
        async with sem:
            return sum(await asyncio.gather(*[episode(e) for e in eps.values()]))

    await cold_caches(engine)
    before = vllm_counters()
    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*[group(eps) for eps in episodes.values()]))
    wall = time.perf_counter() - t0
    return wall, tokens, {"gaps": gaps(rec.calls, t0), "vllm": delta(vllm_counters(), before)}


# ------------------------------------------------------------------ (2) prefill sharing


def first_prompt(engine: Any, task: Any, frames: int, size: tuple[int, int]) -> tuple[list[int], list[np.ndarray]]:
    """The group's first prompt with a `frames`-frame overview: rendered as the agent loop does."""
    from configs.schema import EnvConfig
    from env import VideoToolEnv
    from models.chat import DEFAULT_SYSTEM_PROMPT, ChatRenderer

    env = VideoToolEnv(EnvConfig(overview_frames=frames, overview_size=list(size)))
    obs, info = env.reset(task)
    if info.get("status") == "FAILED":
        raise RuntimeError(f"env reset failed on {task.id}: {info.get('error')}")
    images = [f.image for f in obs.frames]
    renderer = ChatRenderer(engine.tokenizer, env.tools, DEFAULT_SYSTEM_PROMPT)
    return engine.expand_image_placeholders(renderer.prompt_ids(obs), images), images


def unshared_variants(engine: Any, ids: list[int], images: list[np.ndarray], n: int) -> list[tuple[list[int], list]]:
    """n prompts of the same length and image count sharing no prefix with each other or `ids`:
    token 1 replaced by a distinct ordinary token, one pixel of every image changed."""
    banned = set(int(t) for t in engine.banned_token_ids) | {engine.image_pad_id} | set(engine.stop_ids)
    special = set(engine.tokenizer.all_special_ids)
    plain = [t for t in range(32, len(engine.tokenizer)) if t not in banned and t not in special and t != ids[1]]
    out = []
    for j in range(n):
        v_ids = list(ids)
        v_ids[1] = plain[j]
        v_images = []
        for im in images:
            im = np.array(im, copy=True)
            im[0, 0, 0] ^= (j + 1)  # a different content hash, the same encoder cost
            v_images.append(im)
        out.append((v_ids, v_images))
    return out


async def prefill_batch(engine: Any, prompts: list[tuple[list[int], list]], warm: bool = False) -> dict[str, float]:
    """Prefill all prompts at once (1 token each) from cold caches, or with the first prompt already
    cached (warm): wall, sum of TTFTs, vLLM counters."""
    from actors.engine import SamplingConfig

    cfg = SamplingConfig(temperature=1.0, max_tokens=1, ignore_stop=True)
    await cold_caches(engine)
    if warm:
        await engine.generate(*prompts[0], cfg)
    before = vllm_counters()
    t0 = time.perf_counter()
    outs = await asyncio.gather(*[engine.generate(ids, ims, cfg) for ids, ims in prompts])
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "ttft_sum_s": sum(o.metrics["ttft_s"] for o in outs), **delta(vllm_counters(), before)}


async def prefill_sharing(engine: Any, task: Any, group_size: int, frames: int, size: tuple[int, int],
                          reps: int) -> dict[str, Any]:
    ids, images = first_prompt(engine, task, frames, size)
    group = [(ids, images)] * group_size
    # (prompts, warm): "cached" is the floor, G requests whose prefill is all prefix-cache hits
    # (the per-request cost: image preprocessing in the frontend, scheduling, one decode step).
    cases = {"single": ([(ids, images)], False), "shared": (group, False),
             "unshared": (unshared_variants(engine, ids, images, group_size), False), "cached": (group, True)}
    runs: dict[str, list[dict]] = {k: [] for k in cases}
    await prefill_batch(engine, cases["single"][0])  # warm-up: the first multimodal request pays one-off costs
    names = list(cases)
    for r in range(reps):  # rotate the order so load from other processes hits every case alike
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(await prefill_batch(engine, *cases[name]))
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    return {"prompt_tokens": len(ids), "images": len(images),
            "image_tokens": sum(engine.image_token_count(im) for im in images), "group_size": group_size,
            **med, "unshared_over_shared": med["unshared"]["wall_s"] / med["shared"]["wall_s"],
            "shared_over_single": med["shared"]["wall_s"] / med["single"]["wall_s"],
            # Above the per-request floor: the prefill work itself (noisy when shared ~ cached).
            "shared_net_s": med["shared"]["wall_s"] - med["cached"]["wall_s"],
            "unshared_net_s": med["unshared"]["wall_s"] - med["cached"]["wall_s"]}


# ------------------------------------------------------------------ driver


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    if w < 28 or h < 28:
        raise argparse.ArgumentTypeError(f"size must be at least 28x28, got {text!r}")
    return w, h


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from configs.schema import RolloutConfig

    d = RolloutConfig()
    ap = argparse.ArgumentParser(description="Agent-loop tokens/s vs bare vLLM, and first-turn prefill sharing.")
    ap.add_argument("--model", help="HF model dir (default: a tiny random Qwen2.5-VL made in a temp dir)")
    ap.add_argument("--data", help="tasks.jsonl (default: demo videos made in a temp dir)")
    ap.add_argument("--groups", type=int, default=2, help="GRPO groups per agent run (one task each)")
    ap.add_argument("--group-size", type=int, default=d.group_size)
    ap.add_argument("--concurrent-groups", type=int, default=d.concurrent_groups)
    ap.add_argument("--max-tokens-per-turn", type=int, default=d.max_tokens_per_turn)
    ap.add_argument("--max-generated-tokens", type=int, default=d.max_generated_tokens)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--reps", type=int, default=3, help="agent run + replay pairs (medians)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed pairs first (a fresh engine's one-off costs)")
    ap.add_argument("--prefill-frames", type=int, default=32, help="overview frames of the prefill-sharing prompt")
    ap.add_argument("--prefill-size", type=_size, default=(320, 180), help="their WIDTHxHEIGHT")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--skip", choices=["agent", "prefill"], help="skip one part")
    args = ap.parse_args(argv)
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    for name in ("groups", "group_size", "concurrent_groups", "max_tokens_per_turn", "max_generated_tokens",
                 "reps", "prefill_frames", "prefill_reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path]:
    """The model dir and tasks file: given, or made in `tmp` (tiny model; demo videos, one per group)."""
    if args.model:
        model = Path(args.model)
    else:
        from models.tiny import make_tiny_model

        model = make_tiny_model(tmp / "model", seed=0)
    if args.data:
        data = Path(args.data)
    else:
        from env.demo import make_demo_data

        data = make_demo_data(tmp / "data", videos=args.groups, seconds=30, seed=int(time.time()) % 10_000)
    return model, data


async def run(args: argparse.Namespace, model: Path, data: Path) -> dict[str, Any]:
    from actors.engine import Engine
    from actors.rollout_worker import RolloutCore
    from configs.schema import EnvConfig, RolloutConfig
    from env import load_tasks

    tasks = load_tasks(data)
    t0 = time.perf_counter()
    # The counting stat logger runs for both sides alike (vLLM's own loggers stay off).
    engine = await Engine.create(model, max_model_len=args.max_model_len, seed=0, stat_loggers=[stats_logger()],
                                 engine_kwargs={"enable_logging_iteration_details": True})
    result: dict[str, Any] = {"engine_start_s": time.perf_counter() - t0, "model": str(model), "data": str(data),
                              "loadavg_start": list(os.getloadavg())}
    print(f"engine up in {result['engine_start_s']:.1f} s; load average {os.getloadavg()[0]:.2f}", flush=True)
    try:
        if args.skip != "agent":
            cfg = RolloutConfig(group_size=args.group_size, concurrent_groups=args.concurrent_groups,
                                max_tokens_per_turn=args.max_tokens_per_turn,
                                max_generated_tokens=args.max_generated_tokens, max_model_len=args.max_model_len,
                                max_context_tokens=args.max_model_len, temperature=args.temperature)
            core = RolloutCore(str(model), tasks, cfg, EnvConfig())
            result["agent_vs_bare"] = await agent_vs_bare(core, engine, args)
        if args.skip != "prefill":
            p = await prefill_sharing(engine, tasks[0], args.group_size, args.prefill_frames, args.prefill_size,
                                      args.prefill_reps)
            result["prefill_sharing"] = p
            print(f"prefill, first prompt of {p['prompt_tokens']} tokens ({p['images']} images, "
                  f"{p['image_tokens']} image tokens), x{p['group_size']} at once, cold caches, medians:")
            for k in ("single", "shared", "unshared", "cached"):
                m = p[k]
                print(f"  {k:9s} wall {m['wall_s']:.3f} s  ttft sum {m['ttft_sum_s']:.3f} s  "
                      f"engine prefill sum {m.get('prefill_time_s', 0):.3f} s  "
                      f"prefix-cache hits {m.get('prefix_cache_hit_rate', 0):.1%} of {m.get('prefix_cache_queries', 0):.0f}  "
                      f"encoder ran on {m.get('encoder_inputs', 0):.0f} images")
            print(f"  unshared / shared wall {p['unshared_over_shared']:.2f}x; shared / single {p['shared_over_single']:.2f}x; "
                  f"above the cached floor: shared {p['shared_net_s']:.3f} s, unshared {p['unshared_net_s']:.3f} s "
                  f"(single alone {p['single']['wall_s']:.3f} s)")
    finally:
        await engine.shutdown()
    result["loadavg_end"] = list(os.getloadavg())
    return result


async def agent_vs_bare(core: Any, engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    """--warmup untimed pairs (the first requests of a fresh engine pay one-off costs), then --reps pairs."""
    reps, warm = [], []
    for r in range(args.warmup + args.reps):
        calls, agent_s, summary = await agent_run(core, engine, args.groups)
        tokens = sum(c.generated for c in calls)
        bare_s, bare_tokens, bare = await bare_run(engine, calls, args.concurrent_groups, args.temperature)
        if bare_tokens != tokens:
            raise RuntimeError(f"the replay generated {bare_tokens} tokens, the agent loop {tokens}")
        rep = {"tokens": tokens, "agent_s": agent_s, "bare_s": bare_s, "agent_tok_s": tokens / agent_s,
               "bare_tok_s": tokens / bare_s, "ratio": bare_s / agent_s,
               "first_call_s": summary["gaps"]["first_call_s_median"], "agent": summary, "bare": bare}
        (warm if r < args.warmup else reps).append(rep)
        print_rep("warm-up" if r < args.warmup else f"rep {r - args.warmup}", rep)
    med = lambda k: statistics.median(x[k] for x in reps)  # noqa: E731
    out = {"groups": args.groups, "group_size": args.group_size, "concurrent_groups": args.concurrent_groups,
           "max_tokens_per_turn": args.max_tokens_per_turn, "max_generated_tokens": args.max_generated_tokens,
           "agent_tok_s": med("agent_tok_s"), "bare_tok_s": med("bare_tok_s"), "ratio": med("ratio"),
           "overhead": 1 - med("ratio"), "agent_s": med("agent_s"), "bare_s": med("bare_s"),
           "first_call_s": med("first_call_s"),
           # An estimate: the agent wall minus the engine's idle start, i.e. as if the groups' resets
           # overlapped other groups' generation (here all groups start together: nothing overlaps).
           "overhead_without_reset_stall": 1 - statistics.median(x["bare_s"] / (x["agent_s"] - x["first_call_s"])
                                                                 for x in reps),
           "reps": reps, "warmup": warm}
    print(f"agent loop vs bare vLLM (median of {len(reps)}): agent {out['agent_tok_s']:.0f} tok/s, bare "
          f"{out['bare_tok_s']:.0f} tok/s, ratio {out['ratio']:.3f}, overhead {out['overhead']:.1%} (goal <= 10%); "
          f"of the {out['agent_s'] - out['bare_s']:.2f} s difference, {out['first_call_s']:.2f} s is the engine idle "
          f"while the groups' env resets decode the overviews (without it: overhead "
          f"{out['overhead_without_reset_stall']:.1%}, an estimate)", flush=True)
    return out


def print_rep(label: str, rep: dict[str, Any]) -> None:
    a, b = rep["agent"], rep["bare"]
    g, bg = a["gaps"], b["gaps"]
    print(f"{label}: {rep['tokens']} tokens in {a['calls']} calls; agent {rep['agent_tok_s']:.0f} tok/s "
          f"({rep['agent_s']:.2f} s), bare {rep['bare_tok_s']:.0f} tok/s ({rep['bare_s']:.2f} s), ratio "
          f"{rep['ratio']:.3f}; turns/ep {a['turns_mean']:.1f}, tool calls/ep {a['tool_calls_mean']:.1f}, "
          f"env {a['env_s_mean']:.2f} s/ep; load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"    engine waits on the loop: first call after {g['first_call_s_median']:.2f} s (bare "
          f"{bg['first_call_s_median']:.3f} s), between turns {g['turn_gap_ms_median']:.0f} ms median / "
          f"{g['turn_gap_ms_mean']:.0f} ms mean (bare {bg['turn_gap_ms_median']:.1f} / {bg['turn_gap_ms_mean']:.1f}); "
          f"prefix-cache hits agent {a['vllm'].get('prefix_cache_hit_rate', 0):.1%} bare "
          f"{b['vllm'].get('prefix_cache_hit_rate', 0):.1%}; encoder images agent "
          f"{a['vllm'].get('encoder_inputs', 0):.0f} bare {b['vllm'].get('encoder_inputs', 0):.0f}", flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="weft_bench_rollout_") as tmp:
        t0 = time.perf_counter()
        model, data = prepare(args, Path(tmp))
        print(f"model {model}, tasks {data} ready in {time.perf_counter() - t0:.1f} s", flush=True)
        result = asyncio.run(run(args, model, data))
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
