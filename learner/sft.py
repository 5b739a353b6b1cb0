"""Cold-start SFT: teach the action format from scripted-policy episodes (as VideoZoomer and VideoThinker do).

Owns
* `to_samples`: trajectories -> samples. The trajectories are ordinary ones: scripted-policy
  episodes played by the one agent loop (`actors.scripted_engine.scripted_trajectories`,
  which `weft sft` calls: the learner does not import actors), or a recorded trajectory file,
  so SFT and RL share one data path (learner/batch.py);
* `sft_step` / `run_sft`: the supervised loss, -mean log p of the model-turn
  tokens (the same chunked, banned-id-aware logprobs as the RL loss);
* `decoupled_mask`: Video-o3's task-decoupled attention for a fraction of the SFT batches
  (trainer.sft_decoupled_mask_frac): answer tokens do not see the global overview's images, and
  each zoom turn does not see the earlier turns' zoomed clips;
* `valid_action_rate`: how often the model's own continuation of a held-out
  turn parses as a clean action (`env.parser.parse_action` with no errors);
* `decision_accuracy`: teacher-forced on the held-out episodes, how often the model gets the tool
  arguments and the answer right and how likely it is to open with a tool call;
* `decision_only` (answer-first episodes train the choice to answer, not the answer) and
  `freeze_vision` (trainer.sft_freeze_vision: the language model learns, the vision tower stays);
* `main_sft`: the `weft sft` command;
* `caption_sample`, `caption_opening_accuracy`, `main_pretrain_vision`: the `weft pretrain-vision`
  command, which teaches a tiny random model to see (env.flash.caption_frames) before its cold start.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from configs.schema import WeftConfig
from learner.batch import MicroBatch, Sample, checked_images, collate, pack, process_images
from learner.kernels.chunked import chunked_token_logprobs
from learner.metrics import MetricsLogger
from learner.trainer import (autocast, compute_dtype, hidden_states, lm_head_weight, pad_id_of, resolve_device,
                             token_ids_of)
from protos.records import Status, Trajectory

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ trajectories -> samples


def to_samples(trajs: Sequence[Trajectory], processor: Any, image_token_id: Optional[int],
               decoder: Any = None) -> list[Sample]:
    """Trajectories -> samples for SFT (advantage unused); FAILED/ABORTED and ones with bad media are skipped."""
    from learner.batch import MediaError, decode_refs

    usable = [t for t in trajs if t.status not in (Status.FAILED, Status.ABORTED) and t.loss_mask.any()]
    need = [r for t in usable if t.pixels is None for r in t.media]
    if need and decoder is None:
        from env.video import get_decoder

        decoder = get_decoder()
    decoded = decode_refs(need, decoder) if need else {}
    out = []
    for t in usable:
        try:
            images = checked_images(t, decoded)
            pv, grid = process_images(images, t.token_ids.astype(np.int64), processor, image_token_id)
        except MediaError as e:
            log.warning("SFT skips %s: %s", t.traj_id, e)
            continue
        out.append(Sample(t.token_ids.astype(np.int64), t.loss_mask.astype(bool), t.behavior_logprobs, 0.0,
                          t.traj_id, pv, grid, images))
    return out


# ------------------------------------------------------------------ the loss


class SftModel:
    """The model, processor and optimizer of an SFT run (a small subset of what Trainer holds)."""

    def __init__(self, cfg: WeftConfig, model_dir: str | Path) -> None:
        from models.hf import banned_token_ids, load_hf_model, load_processor, token_types_fn

        self.cfg, self.tc = cfg, cfg.trainer
        self.device = resolve_device(self.tc.device)
        self.dtype = compute_dtype(self.tc.dtype, self.device)
        self.model = load_hf_model(model_dir, "float32", str(self.device)).train()
        self.processor = load_processor(model_dir)
        self.tokenizer = self.processor.tokenizer
        self.image_token_id, self.video_token_id = token_ids_of(self.model)
        self.token_types = token_types_fn(self.model.config) if self.image_token_id is not None else None
        self.banned = torch.tensor(banned_token_ids(self.model.config, len(self.tokenizer)), dtype=torch.long,
                                   device=self.device)
        self.pad_id = pad_id_of(self.tokenizer, (self.image_token_id, self.video_token_id))
        self.frozen = freeze_vision(self.model) if self.tc.sft_freeze_vision else 0
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.tc.sft_lr,
                                           betas=tuple(self.tc.betas), eps=self.tc.eps, weight_decay=self.tc.weight_decay)

    def micro_batches(self, samples: Sequence[Sample]) -> list[MicroBatch]:
        return [self.collate([samples[i] for i in idx])
                for idx in pack([s.num_tokens for s in samples], self.tc.micro_batch_tokens)]

    def collate(self, rows: Sequence[Sample]) -> MicroBatch:
        return collate(rows, pad_id=self.pad_id, image_token_id=self.image_token_id, video_token_id=self.video_token_id,
                       device=self.device, token_types=self.token_types)

    def step(self, samples: Sequence[Sample], decoupled: bool = False) -> dict[str, float]:
        """One optimizer step of -mean log p over the samples' model-turn tokens; `decoupled`: under
        Video-o3's task-decoupled attention mask (`decoupled_mask`)."""
        t0 = time.perf_counter()
        packs = pack([s.num_tokens for s in samples], self.tc.micro_batch_tokens)
        mbs = [self.collate([samples[i] for i in idx]) for idx in packs]
        total = float(sum(int(mb.mask.sum()) for mb in mbs))
        if total == 0:
            raise ValueError("SFT batch has no model-turn tokens")
        self.optimizer.zero_grad(set_to_none=True)
        nll, correct = 0.0, 0
        for idx, mb in zip(packs, mbs):
            inputs = masked_inputs(self.model, mb.inputs, [samples[i] for i in idx], self.image_token_id) \
                if decoupled else mb.inputs
            with autocast(self.device, self.dtype):
                hidden = hidden_states(self.model, inputs)[:, :-1]
            h = hidden[mb.mask]
            w = lm_head_weight(self.model)
            w = w if w.dtype == h.dtype else w.to(h.dtype)
            tgt = mb.targets[mb.mask]
            logp = chunked_token_logprobs(h, w, tgt, chunk_size=self.tc.chunk_size, banned=self.banned)
            loss = -logp.sum() / total
            loss.backward()
            nll += float(loss.detach())
            correct += _argmax_hits(h.detach(), w.detach(), tgt, self.banned, self.tc.chunk_size)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                              self.tc.grad_clip if self.tc.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"sft/loss": nll, "sft/token_acc": correct / total, "sft/tokens": int(total),
                "sft/decoupled_mask": float(decoupled),
                "grad_norm": float(norm), "lr": self.tc.sft_lr, "time/step_s": time.perf_counter() - t0}


def freeze_vision(model: Any) -> int:
    """Keep the vision tower and its merger (the Qwen-VL families' `model.visual`) fixed: no gradient, and so
    no optimizer state or update. Returns how many parameters it froze."""
    visual = getattr(getattr(model, model.base_model_prefix, model), "visual", None)
    if visual is None:
        raise ValueError(f"trainer.sft_freeze_vision: {type(model).__name__} has no vision tower at model.visual")
    n = 0
    for p in visual.parameters():
        p.requires_grad_(False)
        n += p.numel()
    return n


@torch.no_grad()
def _argmax_hits(h: torch.Tensor, w: torch.Tensor, tgt: torch.Tensor, banned: torch.Tensor, chunk: int) -> int:
    """How many rows rank their target first (banned ids excluded), a chunk of rows at a time."""
    hits = 0
    for s in range(0, h.shape[0], chunk):
        z = (h[s:s + chunk] @ w.t()).float()
        if banned.numel():
            z.index_fill_(1, banned, -math.inf)
        hits += int((z.argmax(-1) == tgt[s:s + chunk]).sum())
    return hits


def run_sft(sm: SftModel, samples: Sequence[Sample], steps: int, *, seed: int = 0,
            logger: Optional[MetricsLogger] = None) -> list[dict[str, float]]:
    """`steps` SFT steps over shuffled epochs of `samples`, trainer.sft_batch_size per step."""
    if not samples:
        raise ValueError("no SFT samples")
    rng = np.random.default_rng(seed)
    order: list[int] = []
    history = []
    for step in range(1, steps + 1):
        batch = []
        while len(batch) < min(sm.tc.sft_batch_size, len(samples)):
            if not order:
                order = rng.permutation(len(samples)).tolist()
            batch.append(samples[order.pop()])
        # Drawn only when on, so a run without the mask sees the same batches as before the knob existed.
        frac = sm.tc.sft_decoupled_mask_frac
        m = sm.step(batch, decoupled=frac > 0 and bool(rng.random() < frac))
        history.append(m)
        if logger is not None:
            logger.log(step, m)
    return history


# ------------------------------------------------------------------ Video-o3's task-decoupled mask


def decoupled_mask(token_ids: np.ndarray, loss_mask: np.ndarray, image_token_id: int, length: Optional[int] = None) -> np.ndarray:
    """Which key each query may attend to, `[T, T]` bool (T = `length`, default the sample's own; longer
    is right padding, causal): causal attention, except that
    * the answer turn (the last model turn, and the position that predicts its first token) does not see
      the global overview's image tokens (the images of the first prompt), so the answer rests on what
      the zooms showed;
    * every other position from zoom clip k on (clip k: the images of the observation after model turn
      k; its own text, images and the model turn that follows) does not see the image tokens of the
      clips before k, so each zoom turn reasons from its own clip.
    Text never disappears: timestamps, questions and tool outputs stay visible."""
    n = len(token_ids)
    t = n if length is None else int(length)
    gen = np.asarray(loss_mask, bool)
    turn = np.cumsum(gen & ~np.r_[False, gen[:-1]])  # generated: its turn (1-based); context: turns before it
    img = (np.asarray(token_ids) == image_token_id) & ~gen
    overview = img & (turn == 0)
    clip = np.where(img & (turn > 0), turn, 0)  # images of the observation after turn k: clip k
    stage = np.where(gen, turn - 1, turn)  # the newest clip a position has seen
    answer = gen & (turn == turn[-1]) if n else gen
    answer = answer | np.r_[answer[1:], False]  # and the position that predicts its first token
    allowed = np.tril(np.ones((t, t), bool))
    block = (answer[:, None] & overview[None, :]) | (
        ~answer[:, None] & (clip[None, :] >= 1) & (clip[None, :] < stage[:, None]))
    allowed[:n, :n] &= ~block
    return allowed


def masked_inputs(model: Any, inputs: dict[str, Any], samples: Sequence[Sample], image_token_id: Optional[int]) -> dict[str, Any]:
    """`inputs` with the decoupled mask of each row as a 4-D attention mask, and the positions (M-RoPE
    included) computed first from the plain 2-D mask, which the 4-D one replaces."""
    if image_token_id is None:
        raise ValueError("the decoupled mask needs a vision-language model (an image token id)")
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if impl.startswith("flash"):
        raise ValueError(f"attention {impl!r} takes no 4-D mask; load the model with sdpa or eager for the decoupled mask")
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    t = ids.shape[1]
    allowed = torch.as_tensor(np.stack([decoupled_mask(s.token_ids, s.loss_mask, image_token_id, t) for s in samples]),
                              device=ids.device)[:, None]
    base = getattr(model, model.base_model_prefix)
    pos = base.compute_3d_position_ids(input_ids=ids, image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=None,
                                       inputs_embeds=None, attention_mask=attn, past_key_values=None,
                                       mm_token_type_ids=inputs.get("mm_token_type_ids"))
    out = dict(inputs)
    out["position_ids"] = pos
    if impl == "eager":  # eager adds the mask to the scores
        out["attention_mask"] = torch.zeros(allowed.shape, dtype=torch.float32, device=ids.device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min)
    else:
        out["attention_mask"] = allowed
    return out


# ------------------------------------------------------------------ does the model speak the format?


def model_turns(traj: Trajectory) -> list[tuple[int, int]]:
    """(start, end) of each contiguous loss-mask span: the policy's turns."""
    m = np.concatenate([[0], traj.loss_mask.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(m))
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])]


@torch.no_grad()
def continue_turn(model: Any, processor: Any, prefix: Sequence[int], images: Sequence[np.ndarray], *,
                  banned: Sequence[int], max_new_tokens: int = 64, do_sample: bool = False,
                  temperature: float = 1.0, stop_ids: Sequence[int] = (),
                  generator: Optional[torch.Generator] = None) -> list[int]:
    """The model's own next turn after `prefix`, sampled as the engine samples: banned ids
    masked, temperature only (or greedy). A plain KV-cache loop: HF generate was ~4x slower here."""
    from models.hf import hf_inputs

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in hf_inputs(model, processor, list(prefix), list(images)).items()}
    base = getattr(model, model.base_model_prefix)
    if hasattr(base, "rope_deltas"):
        base.rope_deltas = None  # M-RoPE offsets of an earlier prompt must not leak into this one
    out = model(**inputs, use_cache=True)
    new: list[int] = []
    ban = torch.tensor(list(banned), dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        z = out.logits[0, -1].float()
        if ban.numel():
            z.index_fill_(0, ban, -math.inf)
        if do_sample:
            tok = int(torch.multinomial(torch.softmax(z / temperature, -1), 1, generator=generator))
        else:
            tok = int(z.argmax())
        new.append(tok)
        if tok in stop_ids:
            break
        out = model(input_ids=torch.tensor([[tok]], device=device), past_key_values=out.past_key_values,
                    use_cache=True)
    return new


def valid_action_rate(model: Any, processor: Any, trajs: Sequence[Trajectory], *, banned: Sequence[int],
                      max_turns: int = 16, max_new_tokens: int = 64, do_sample: bool = False,
                      temperature: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Fraction of held-out model turns whose continuation by `model` parses as a clean action.

    For each model turn of each trajectory (up to max_turns), the model continues the
    recorded prefix (with its images); the text up to `<|im_end|>` is parsed with
    `env.parser.parse_action`: valid means no errors and a tool call or an answer.
    """
    from env.parser import parse_action

    tok = processor.tokenizer
    stops = [i for i in (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("</answer>"))
             if isinstance(i, int) and i >= 0]
    image_id = getattr(model.config, "image_token_id", None)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    n, ok, examples = 0, 0, []
    was_training = model.training
    model.eval()
    try:
        for t in trajs:
            images = _images_of(t)
            for start, _ in model_turns(t):
                if n >= max_turns:
                    break
                prefix = t.token_ids[:start].tolist()
                runs = 0 if image_id is None else int(np.sum(np.diff(np.r_[0, (t.token_ids[:start] == image_id)
                                                                         .astype(np.int8)]) == 1))
                new = continue_turn(model, processor, prefix, images[:runs], banned=banned,
                                    max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                    stop_ids=stops, generator=gen)
                text = tok.decode(new, skip_special_tokens=False).split("<|im_end|>")[0]
                parsed = parse_action(text)
                good = not parsed.errors and (bool(parsed.calls) or parsed.answer is not None)
                n, ok = n + 1, ok + int(good)
                if len(examples) < 4:
                    examples.append({"text": text[:200], "valid": good})
    finally:
        model.train(was_training)
    return {"rate": ok / n if n else 0.0, "turns": n, "valid": ok, "examples": examples}


@torch.no_grad()
def decision_accuracy(sm: SftModel, trajs: Sequence[Trajectory]) -> dict[str, Any]:
    """What the cold start got right where a policy decides, teacher-forced on held-out scripted episodes.

    * `arguments`: per `tool.argument`, the fraction of calls whose value tokens are each the model's argmax
      (temporal_zoom.start: did it copy the start of the segment the search returned?);
    * `answer`: the same for the tokens inside `<answer></answer>`;
    * `first_call_p`: the mean probability of the script's first token where its first turn is a tool call
      (below 0.5 the greedy policy does not look there; it is how often sampling does).
    Whether GRPO from a cold start learns to look follows these (README, demo reliability): a wrong
    copy or reading makes looking pay little more than guessing, and a rare look gives GRPO little to push."""
    tok, w = sm.tokenizer, lm_head_weight(sm.model)
    hits: dict[str, list[bool]] = {}
    first_p: list[float] = []
    measured = 0
    was_training = sm.model.training
    sm.model.eval()
    try:
        for t in trajs:
            samples = to_samples([t], sm.processor, sm.image_token_id)  # none when its media fail (logged)
            if not samples:
                continue
            measured += 1
            h = hidden_states(sm.model, sm.collate(samples).inputs)[0]
            ids = t.token_ids
            for n, (a, b) in enumerate(model_turns(t)):
                # Logits of this turn's positions only: [turn, vocab], never [episode, vocab].
                z = (h[a - 1:b - 1] @ w.t().to(h.dtype)).float()
                if sm.banned.numel():
                    z.index_fill_(1, sm.banned, -math.inf)
                pred = z.argmax(-1).cpu().numpy()  # pred[j]: the model's guess at token a + j
                action, spans = _value_spans(tok, ids[a:b].tolist())
                if n == 0 and action.calls:
                    first_p.append(float(torch.softmax(z[0], -1)[int(ids[a])]))
                for key, lo, hi in spans:
                    hits.setdefault(key, []).append(bool((pred[lo:hi] == ids[a + lo:a + hi]).all()))
    finally:
        sm.model.train(was_training)
    rate = {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}
    return {"arguments": {k: v for k, v in rate.items() if k != "answer"}, "answer": rate.get("answer"),
            "first_call_p": round(float(np.mean(first_p)), 3) if first_p else None, "episodes": measured}


def _value_spans(tok: Any, ids: list[int]) -> tuple[Any, list[tuple[str, int, int]]]:
    """The turn parsed (`env.parser.parse_action`) and, for each tool-call argument value and the answer,
    (name, first token, end token) within `ids`. A value is found as its JSON after `"key": ` (how the
    scripts write calls); one written otherwise is left out."""
    from env.parser import parse_action

    text = tok.decode(ids)
    ends = [len(tok.decode(ids[:i + 1])) for i in range(len(ids))]  # where token i's text ends

    def tokens(lo: int, hi: int) -> tuple[int, int]:
        first = next(i for i, e in enumerate(ends) if e > lo)
        return first, next((i for i, e in enumerate(ends) if e >= hi), len(ids) - 1) + 1

    spans, pos = [], 0
    parsed = parse_action(text)
    for call in parsed.calls:
        for key, value in (call.arguments or {}).items():
            needle, written = f'"{key}": ', json.dumps(value)
            at = text.find(needle + written, pos)
            if at >= 0:
                pos = at + len(needle)
                spans.append((f"{call.name}.{key}", *tokens(pos, pos + len(written))))
    if parsed.answer is not None and "<answer>" in text and "</answer>" in text:
        lo = text.index("<answer>") + len("<answer>")
        spans.append(("answer", *tokens(lo, text.index("</answer>", lo))))
    return parsed, spans


def _images_of(t: Trajectory) -> list[np.ndarray]:
    """Inline pixels, or the re-decoded (hash-checked) images of the trajectory's FrameRefs."""
    if t.pixels is not None or not t.media:
        return list(t.pixels or [])
    from env.video import get_decoder
    from learner.batch import decode_refs

    return checked_images(t, decode_refs(t.media, get_decoder()))


# ------------------------------------------------------------------ perception pretraining (`weft pretrain-vision`)

CAPTION_PROMPT = "What flashes up?"


def caption_sample(images: Sequence[np.ndarray], caption: str, processor: Any, image_token_id: Optional[int],
                   prompt: str = CAPTION_PROMPT, end_of_turn: str = "<|im_end|>") -> Sample:
    """A one-turn sample through the chat template: the user shows `images` and asks `prompt`; the model
    turn, the only tokens trained, is `caption`."""
    from models.hf import expand_image_placeholders

    tok = processor.tokenizer
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    prompt_ids = expand_image_placeholders(tok.encode(text, add_special_tokens=False), list(images), processor)
    ids = np.asarray(prompt_ids + tok.encode(caption + end_of_turn, add_special_tokens=False), np.int64)
    mask = np.arange(len(ids)) >= len(prompt_ids)
    pv, grid = process_images(list(images), ids, processor, image_token_id)
    return Sample(ids, mask, np.zeros(len(ids), np.float32), 0.0, "", pv, grid, list(images))


@torch.no_grad()
def caption_opening_accuracy(sm: SftModel, samples: Sequence[Sample], opening: int = 2) -> float:
    """Fraction of samples whose caption's first `opening` tokens are each the model's argmax, teacher-forced:
    for "a <colour> <shape> flashes up" that is "a <colour>", whether the model saw the colour."""
    was_training = sm.model.training
    sm.model.eval()
    hits = 0
    try:
        for s in samples:
            mb = sm.collate([s])
            h = hidden_states(sm.model, mb.inputs)[:, :-1][mb.mask][:opening]
            tgt = mb.targets[mb.mask][:opening]
            hits += _argmax_hits(h, lm_head_weight(sm.model).to(h.dtype), tgt, sm.banned, sm.tc.chunk_size) == len(tgt)
    finally:
        sm.model.train(was_training)
    return hits / max(1, len(samples))


def main_pretrain_vision(args: argparse.Namespace) -> int:
    """`weft pretrain-vision`: teach a tiny random model to see before its cold start.

    A random tiny model stands in for a pretrained VLM, and a pretrained VLM names a red triangle on sight;
    a random one does not, and learning colours from 64 cold-start episodes is where the demo's tiny models
    failed (their answers on held-out videos read the colour at 0.25-0.75 teacher-forced). So it first
    learns to caption synthetic frames (env.flash.caption_frames: the demo's backgrounds, no task video)
    with the SFT loss. Prints a JSON summary last, with the caption-opening accuracy on fresh examples."""
    from configs import load_config
    from env.flash import caption_frames

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The vision tower is what this trains: never frozen here, whatever the config says for the cold start.
    cfg = load_config(args.config, [*args.overrides, f"trainer.sft_lr={args.lr}", f"trainer.sft_batch_size={args.batch_size}",
                                    "trainer.sft_freeze_vision=false"])
    torch.manual_seed(cfg.seed)
    sm = SftModel(cfg, args.model)
    size = tuple(cfg.env.zoom_size)

    def make(n: int, seed: int) -> list[Sample]:
        rng = np.random.default_rng([seed, 5])
        return [caption_sample(*caption_frames(rng, size), sm.processor, sm.image_token_id) for _ in range(n)]

    t0 = time.perf_counter()
    train, held = make(args.examples, cfg.seed), make(args.held_out, cfg.seed + 10**6)
    made = time.perf_counter() - t0
    before = caption_opening_accuracy(sm, held)
    out = Path(args.out)
    logger = MetricsLogger(out / "pretrain_logs", tensorboard=cfg.trainer.tensorboard)
    history = run_sft(sm, train, args.steps, seed=cfg.seed, logger=logger)
    logger.close()
    after = caption_opening_accuracy(sm, held)
    sm.model.save_pretrained(out)
    sm.processor.save_pretrained(out)
    print(json.dumps({"out": str(out), "steps": args.steps, "examples": len(train), "data_seconds": round(made, 1),
                      "seconds": round(time.perf_counter() - t0, 1), "loss_first": history[0]["sft/loss"],
                      "loss_last": history[-1]["sft/loss"], "held_out": len(held),
                      "caption_opening_accuracy_before": before, "caption_opening_accuracy_after": after}))
    return 0


# ------------------------------------------------------------------ `weft sft`


def decision_only(t: Trajectory, tokenizer: Any, marker: str = "<answer>") -> Trajectory:
    """The trajectory with loss only on its generated tokens up to the end of `marker`: an answer-first
    episode then teaches the choice to answer now rather than call a tool, and not the answer, which it
    gave without evidence. A trajectory whose generated text never reaches `marker` trains nothing."""
    import dataclasses

    gen = np.flatnonzero(t.loss_mask)
    keep = np.zeros_like(t.loss_mask)
    for k in range(1, len(gen) + 1):
        if marker in tokenizer.decode(t.token_ids[gen[:k]].tolist()):
            keep[gen[:k]] = 1
            break
    return dataclasses.replace(t, loss_mask=keep)


def load_sft_data(data: str | Path, processor: Any, cfg: WeftConfig,
                  scripted: Optional[Callable[..., list[Trajectory]]] = None) -> tuple[list[Trajectory], list[Trajectory]]:
    """(train, held-out) trajectories: scripted episodes of a task file (`scripted(tasks, processor, cfg,
    episodes, seed=..., make_policy=...)` plays them, as actors.scripted_engine.scripted_trajectories does), or a trajectory file split 7:1."""
    path = Path(data)
    task_file = path / "tasks.jsonl" if path.is_dir() else path
    if task_file.suffix == ".jsonl":
        from env.tasks import load_tasks

        if scripted is None:
            raise ValueError("SFT from a task file needs something to play the episodes (`weft sft` passes "
                             "actors.scripted_engine.scripted_trajectories)")
        tasks = load_tasks(task_file)
        n_eval = max(1, len(tasks) // 8) if cfg.trainer.sft_eval_turns and len(tasks) > 1 else 0
        train_tasks, eval_tasks = tasks[n_eval:], tasks[:n_eval]
        train = scripted(train_tasks, processor, cfg, cfg.trainer.sft_episodes, seed=cfg.seed)
        if cfg.trainer.sft_no_tools_episodes:
            from configs import eval_config

            baseline = eval_config(cfg, no_tools=True, frames=cfg.env.overview_frames + cfg.env.max_frames)
            train += scripted(train_tasks, processor, baseline, cfg.trainer.sft_no_tools_episodes, seed=cfg.seed + 1)
        if cfg.trainer.sft_answer_first_episodes:
            from env.testing import BlindPolicy

            first = scripted(train_tasks, processor, cfg, cfg.trainer.sft_answer_first_episodes, seed=cfg.seed + 2,
                             make_policy=lambda i: BlindPolicy(seed=cfg.seed + 2 + i))
            train += [decision_only(t, processor.tokenizer) for t in first]
        held = scripted(eval_tasks, processor, cfg, len(eval_tasks), seed=cfg.seed + 10**6) if eval_tasks else []
        return train, held
    from protos.codec import read_trajectories

    trajs = read_trajectories(path)
    n_eval = len(trajs) // 8 if cfg.trainer.sft_eval_turns else 0
    return trajs[n_eval:], trajs[:n_eval]


def main_sft(args: argparse.Namespace, scripted: Optional[Callable[..., list[Trajectory]]] = None) -> int:
    """`weft sft`: supervised cold start on scripted (or recorded) trajectories; prints a JSON summary last."""
    from configs import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    steps = args.steps if args.steps is not None else cfg.trainer.sft_steps
    if steps < 1:
        raise SystemExit("--steps must be >= 1")
    torch.manual_seed(cfg.seed)
    sm = SftModel(cfg, args.model)
    train, held = load_sft_data(args.data, sm.processor, cfg, scripted)
    samples = to_samples(train, sm.processor, sm.image_token_id)
    held = [t for t in held if t.status not in (Status.FAILED, Status.ABORTED)]
    banned = sm.banned.tolist()
    before = valid_action_rate(sm.model, sm.processor, held, banned=banned, max_turns=cfg.trainer.sft_eval_turns) \
        if held and cfg.trainer.sft_eval_turns else None
    out = Path(args.out)
    logger = MetricsLogger(out / "sft_logs", tensorboard=cfg.trainer.tensorboard)
    t0 = time.perf_counter()
    history = run_sft(sm, samples, steps, seed=cfg.seed, logger=logger)
    logger.close()
    after = valid_action_rate(sm.model, sm.processor, held, banned=banned, max_turns=cfg.trainer.sft_eval_turns) \
        if before is not None else None
    sm.model.save_pretrained(out)
    sm.processor.save_pretrained(out)
    summary = {"out": str(out), "steps": steps, "samples": len(samples), "frozen_parameters": sm.frozen,
               "seconds": round(time.perf_counter() - t0, 1),
               "loss_first": history[0]["sft/loss"], "loss_last": history[-1]["sft/loss"],
               "token_acc_last": history[-1]["sft/token_acc"],
               "valid_action_rate_before": None if before is None else before["rate"],
               "valid_action_rate_after": None if after is None else after["rate"],
               "held_out_decisions": decision_accuracy(sm, held) if held else None}
    print(json.dumps(summary))
    return 0
