"""Cold-start SFT: scripted episodes rendered token-in/token-out as the agent loop renders them, and a
tiny model that learns the action format from them (valid-action rate measured before and after)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from env.parser import parse_action


def _cfg(make_cfg, *extra):
    return make_cfg("trainer.sft_lr=1e-3", "trainer.sft_batch_size=1", *extra)


def test_scripted_episode_is_rendered_like_the_agent_loop(make_cfg, processor, demo_tasks):
    """The SFT's episodes come from the one agent loop with a scripted engine: each turn's tokens are what
    the model engine returns for that text (ended at </answer> or with <|im_end|>), the prompt is the
    renderer's, and every image run has a FrameRef that re-decodes to the pixels it recorded."""
    from actors.scripted_engine import scripted_trajectories
    from env.env import VideoToolEnv
    from learner.batch import checked_images, decode_refs, image_runs
    from learner.sft import model_turns
    from models.chat import ChatRenderer
    from models.hf import expand_image_placeholders

    cfg = make_cfg()
    tok = processor.tokenizer
    t = scripted_trajectories(demo_tasks[:1], processor, cfg, 1)[0]
    assert t.status.value == "COMPLETED" and t.reward_terms["accuracy"] == 1.0  # the oracle answers from pixels
    texts = t.metadata["turn_texts"]
    turns = model_turns(t)
    assert len(turns) == len(texts) == 3
    for (s, e), text in zip(turns, texts):
        decoded = tok.decode(t.token_ids[s:e].tolist(), skip_special_tokens=False)
        assert decoded == text  # the turn text is what the engine returned, token for token
        # ... which stops at </answer> (the last turn), else ends the turn with <|im_end|>.
        assert text.endswith("</answer>") if (s, e) == turns[-1] else text.endswith("<|im_end|>")
        parsed = parse_action(text.removesuffix("<|im_end|>"))
        assert not parsed.errors and (parsed.calls or parsed.answer)
    # The prompt is exactly what the agent loop's renderer produces, image runs expanded.
    env = VideoToolEnv(cfg.env, cfg.reward)
    obs, _ = env.reset(demo_tasks[0])
    prompt = expand_image_placeholders(ChatRenderer(tok, env.tools).prompt_ids(obs), [f.image for f in obs.frames],
                                       processor)
    assert t.token_ids[: len(prompt)].tolist() == prompt and turns[0][0] == len(prompt)
    # One image run per media ref, each re-decoding to the pixels it recorded (checked_images checks the hash).
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert len(image_runs(t.token_ids, image_id)) == len(t.media) > len(obs.frames)
    from env.video import get_decoder

    assert len(checked_images(t, decode_refs(t.media, get_decoder()))) == len(t.media)
    assert (t.behavior_logprobs == 0).all() and set(t.policy_version[t.loss_mask == 1].tolist()) == {0}


def test_incremental_decoding_agrees_with_a_full_forward(tiny_dir, processor, make_cfg, demo_tasks):
    """continue_turn's KV-cache loop keeps the M-RoPE positions right after images."""
    from actors.scripted_engine import scripted_trajectories
    from env.video import get_decoder
    from learner.batch import checked_images, decode_refs
    from learner.sft import continue_turn, model_turns
    from models.hf import banned_token_ids_of, hf_inputs, load_hf_model

    model = load_hf_model(tiny_dir)
    banned = banned_token_ids_of(tiny_dir)
    t = scripted_trajectories(demo_tasks[1:2], processor, make_cfg(), 1)[0]
    pixels = checked_images(t, decode_refs(t.media, get_decoder()))
    start = model_turns(t)[1][0]  # the second turn: images of the overview and of the zoom before it
    prefix = t.token_ids[:start].tolist()
    n_img = len([r for r in t.media])  # images before the second turn: all but the spatial zoom's
    runs = int(np.sum(np.diff(np.r_[0, (t.token_ids[:start] == model.config.image_token_id).astype(np.int8)]) == 1))
    assert 0 < runs < n_img
    new = continue_turn(model, processor, prefix, pixels[:runs], banned=banned, max_new_tokens=12)
    with torch.no_grad():
        logits = model(**hf_inputs(model, processor, prefix + new, pixels[:runs])).logits[0].float()
    logits[:, banned] = float("-inf")
    assert logits[len(prefix) - 1: len(prefix) + len(new) - 1].argmax(-1).tolist() == new


def test_sft_teaches_the_action_format(tiny_dir, make_cfg, demo_tasks):
    from actors.scripted_engine import scripted_trajectories
    from learner.sft import SftModel, run_sft, to_samples, valid_action_rate

    cfg = _cfg(make_cfg)
    torch.manual_seed(0)
    sm = SftModel(cfg, tiny_dir)
    train = scripted_trajectories(demo_tasks[:4], sm.processor, cfg, 8)
    held = scripted_trajectories(demo_tasks[4:], sm.processor, cfg, 2, seed=99)  # tasks never trained on
    samples = to_samples(train, sm.processor, sm.image_token_id)
    banned = sm.banned.tolist()
    kw = dict(banned=banned, max_turns=6, max_new_tokens=100)
    before = valid_action_rate(sm.model, sm.processor, held, **kw)
    history = run_sft(sm, samples, 80, seed=0)
    after = valid_action_rate(sm.model, sm.processor, held, **kw)
    sampled = valid_action_rate(sm.model, sm.processor, held, do_sample=True, seed=1, **kw)
    print(f"\nSFT loss {history[0]['sft/loss']:.2f} -> {history[-1]['sft/loss']:.2f}; valid-action rate on "
          f"{after['turns']} held-out turns: greedy {before['rate']:.2f} -> {after['rate']:.2f}, "
          f"sampled (T=1) after {sampled['rate']:.2f}; e.g. {after['examples'][:2]}")
    assert before["turns"] == after["turns"] == 6
    assert history[-1]["sft/loss"] < 0.3 * history[0]["sft/loss"]
    assert before["rate"] <= 1 / 6  # a random model essentially never writes a clean action
    assert after["rate"] >= before["rate"] + 0.5
    _check_decision_accuracy(sm, held)


def _check_decision_accuracy(sm, held):
    """decision_accuracy, teacher-forced on the held-out episodes: the constant arguments the SFT taught are
    right, and the same episodes with one value changed to one the script never wrote score 0 for it (the
    measured tokens are the value's, not their neighbours')."""
    import dataclasses

    from learner.sft import _value_spans, decision_accuracy, model_turns

    got = decision_accuracy(sm, held)
    assert got["episodes"] == 2 and set(got["arguments"]) >= {"temporal_zoom.start", "temporal_zoom.num_frames",
                                                               "temporal_search.top_k", "spatial_zoom.bbox"}, got
    assert got["arguments"]["temporal_search.top_k"] == 1.0 and got["arguments"]["temporal_zoom.num_frames"] == 1.0
    assert 0.0 <= got["first_call_p"] <= 1.0 and got["answer"] is not None
    tok = sm.tokenizer
    t = held[0]
    for a, b in model_turns(t):  # each measured span is the fewest tokens that hold its value
        action, spans = _value_spans(tok, t.token_ids[a:b].tolist())
        for key, lo, hi in spans:
            want = action.answer if key == "answer" else json.dumps(next(
                c.arguments[key.split(".")[1]] for c in action.calls if c.name == key.split(".")[0]))
            ids = t.token_ids[a:b].tolist()
            assert want in tok.decode(ids[lo:hi]), (key, want)
            assert want not in tok.decode(ids[lo + 1:hi]) and want not in tok.decode(ids[lo:hi - 1]), (key, want)
    changed = []
    for t in held:
        ids = t.token_ids.copy()
        a, b = model_turns(t)[0]
        at = tok.decode(ids[a:b].tolist()).index('"top_k": ') + len('"top_k": ')
        i = next(i for i in range(a, b) if len(tok.decode(ids[a:i + 1].tolist())) > at)
        assert tok.decode([int(ids[i])]).strip() == "3"  # the oracle searches with top_k 3
        ids[i] = tok.convert_tokens_to_ids(tok.tokenize(" 5"))[0]
        changed.append(dataclasses.replace(t, token_ids=ids))
    bad = decision_accuracy(sm, changed)
    assert bad["arguments"]["temporal_search.top_k"] == 0.0, bad
    assert bad["arguments"]["temporal_zoom.num_frames"] == 1.0, bad


def test_weft_sft_command(tiny_dir, demo_tasks, processor, make_cfg, tmp_path, capsys):
    from actors.scripted_engine import scripted_trajectories
    from learner.sft import main_sft
    from weft_cli import add_sft_args
    from models.hf import load_hf_model
    from protos.codec import write_trajectories

    # From a trajectory file (FrameRefs only: the pixels are re-decoded from the videos).
    trajs = scripted_trajectories(demo_tasks[:2], processor, make_cfg(), 2)
    path = tmp_path / "trajs.msgpack"
    write_trajectories(path, trajs)
    out = tmp_path / "sft_model"
    parser = add_sft_args(argparse.ArgumentParser())
    args = parser.parse_args(["--model", str(tiny_dir), "--data", str(path), "--steps", "2", "--out", str(out),
                              "trainer.sft_eval_turns=0", "trainer.tensorboard=false", "env.overview_frames=2"])
    assert main_sft(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["samples"] == 2 and summary["valid_action_rate_after"] is None
    tuned, base = load_hf_model(out), load_hf_model(tiny_dir)
    assert not torch.equal(tuned.lm_head.weight, base.lm_head.weight)
    assert (out / "tokenizer.json").is_file() and (out / "processor_config.json").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", str(tiny_dir)])  # --data and --out are required


def test_answer_first_episodes_train_the_choice_to_answer_and_not_the_answer(make_cfg, processor, demo_dir):
    """trainer.sft_answer_first_episodes: episodes, tools offered, that answer in the first turn. Only the
    turn's opening up to `<answer>` carries loss (the choice to answer now, not call a tool); the letter,
    given without evidence, and the rest of the turn carry none. The oracle episodes keep every token."""
    from actors.scripted_engine import scripted_trajectories
    from learner.sft import load_sft_data, model_turns

    cfg = make_cfg("trainer.sft_episodes=2", "trainer.sft_answer_first_episodes=3", "trainer.sft_eval_turns=0")
    tok = processor.tokenizer
    train, held = load_sft_data(demo_dir, processor, cfg, scripted_trajectories)
    assert len(train) == 5 and held == []
    oracle, first = train[:2], train[2:]
    for t in oracle:
        assert len(model_turns(t)) >= 2 and "<tool_call>" in t.metadata["turn_texts"][0]
        assert t.loss_mask.sum() == sum(e - s for s, e in model_turns(t))
    for t in first:
        (turn,) = model_turns(t)  # one turn: the answer, no tool called
        assert t.metadata["turn_texts"] == [t.metadata["turn_texts"][0]] and "<tool_call>" not in t.metadata["turn_texts"][0]
        assert t.metadata["turn_texts"][0].startswith("<answer>")
        trained = tok.decode(t.token_ids[t.loss_mask == 1].tolist(), skip_special_tokens=False)
        assert trained == "<answer>" and np.flatnonzero(t.loss_mask).tolist() == [turn[0]], trained


# ---------------------------------------------------------------- Video-o3's task-decoupled mask


def _dense_decoupled(ids, gen, image_id):
    """The rules pair by pair, from the segments (the vectorised builder must agree)."""
    n = len(ids)
    turn_of, turn, prev = [], 0, False
    for g in gen:
        turn += int(g and not prev)
        prev = g
        turn_of.append(turn)
    last = turn_of[-1]
    out = np.zeros((n, n), bool)
    for q in range(n):
        q_answer = (gen[q] and turn_of[q] == last) or (q + 1 < n and gen[q + 1] and turn_of[q + 1] == last)
        q_stage = turn_of[q] - 1 if gen[q] else turn_of[q]
        for k in range(q + 1):
            k_img = ids[k] == image_id and not gen[k]
            if q_answer and k_img and turn_of[k] == 0:
                continue  # the answer does not see the overview's images
            if not q_answer and k_img and 1 <= turn_of[k] < q_stage:
                continue  # a zoom turn does not see earlier clips
            out[q, k] = True
    return out


def test_decoupled_mask_matches_the_dense_rules_on_scripted_episodes(make_cfg, processor, demo_tasks):
    from actors.scripted_engine import scripted_trajectories
    from learner.sft import decoupled_mask

    cfg = make_cfg("env.max_turns=4")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    trajs = scripted_trajectories(demo_tasks[:2], processor, cfg, 2)
    for t in trajs:
        ids, gen = t.token_ids.astype(np.int64), t.loss_mask.astype(bool)
        got = decoupled_mask(ids, gen, image_id)
        assert np.array_equal(got, _dense_decoupled(ids.tolist(), gen.tolist(), image_id))
        assert (~got & np.tril(np.ones_like(got))).any()  # something really is masked
        padded = decoupled_mask(ids, gen, image_id, len(ids) + 5)
        assert np.array_equal(padded[: len(ids), : len(ids)], got) and padded[len(ids):].sum() > 0
    # A hand-made episode: prompt [P I I], turn 1 [a], clip 1 [c I], turn 2 [b], clip 2 [d I e], answer [z z]
    I = image_id
    ids = np.array([5, I, I, 6, 7, I, 8, 7, I, 7, 9, 9])
    gen = np.array([0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 1], bool)
    m = decoupled_mask(ids, gen, I)
    assert not m[10, 1] and not m[11, 2] and m[10, 5] and m[11, 8]  # the answer: no overview, every clip
    assert not m[9, 1] and m[9, 5]  # ... nor the position that predicts its first token
    assert m[6, 5] and m[6, 1]  # turn 2 reasons from clip 1, which it has just been shown
    assert not m[8, 5] and not m[7, 5] and m[8, 8] and m[8, 1]  # clip 2 does not see clip 1's images
    assert m[4, 2] and m[5, 1] and m[3, 1]  # up to clip 1 nothing is hidden


def test_decoupled_mask_gives_masked_positions_no_gradient(tiny_dir, make_cfg, demo_tasks):
    """Through the model, masked pairs really get nothing: with the mask, the answer tokens' loss has exactly
    zero gradient with respect to the overview images' hidden states entering the last decoder layer (the
    only path from there to the answer is that layer's attention; earlier layers may carry overview
    information to the answer through tokens it may see, as the mask intends), and every layer's
    attention weight on a masked pair is exactly 0. Without the mask both are non-zero."""
    from actors.scripted_engine import scripted_trajectories
    from learner.sft import SftModel, decoupled_mask, masked_inputs, to_samples
    from learner.trainer import hidden_states, lm_head_weight

    cfg = _cfg(make_cfg)
    sm = SftModel(cfg, tiny_dir)
    t = scripted_trajectories(demo_tasks[:1], sm.processor, cfg, 1)[0]
    s = to_samples([t], sm.processor, sm.image_token_id)[0]
    mb = sm.collate([s])
    gen = s.loss_mask.astype(bool)
    turn = np.cumsum(gen & ~np.r_[False, gen[:-1]])
    answer_rows = torch.as_tensor((gen & (turn == turn[-1]))[1:])[None]  # shifted: position i predicts token i+1
    overview = torch.as_tensor((s.token_ids == sm.image_token_id) & (turn == 0))
    allowed = torch.as_tensor(decoupled_mask(s.token_ids, s.loss_mask, sm.image_token_id))
    layers = getattr(sm.model, sm.model.base_model_prefix).language_model.layers
    grads, weights = {}, {}
    for name, decoupled in (("plain", False), ("masked", True)):
        inputs = dict(masked_inputs(sm.model, mb.inputs, [s], sm.image_token_id) if decoupled else mb.inputs)
        held = {}

        def cut(module, args, kwargs):
            x = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().requires_grad_(True)
            held["x"] = x
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": x}
            return (x, *args[1:]), kwargs

        hook = layers[-1].register_forward_pre_hook(cut, with_kwargs=True)
        try:
            hidden = hidden_states(sm.model, inputs)[:, :-1]
        finally:
            hook.remove()
        logits = hidden[answer_rows] @ lm_head_weight(sm.model).t()
        loss = torch.log_softmax(logits.float(), -1).gather(-1, mb.targets[answer_rows][:, None]).sum()
        (g,) = torch.autograd.grad(loss, held["x"])
        grads[name] = g[0, overview]
        sm.model.config._attn_implementation = "eager"  # to read the attention weights
        try:
            out = getattr(sm.model, sm.model.base_model_prefix)(
                **masked_inputs(sm.model, mb.inputs, [s], sm.image_token_id) if decoupled else mb.inputs,
                output_attentions=True, use_cache=False)
        finally:
            sm.model.config._attn_implementation = "sdpa"
        weights[name] = torch.stack([a[0] for a in out.attentions])  # [layers, heads, T, T]
    assert float(grads["plain"].abs().max()) > 0
    assert float(grads["masked"].abs().max()) == 0.0
    masked_pairs = ~allowed & torch.tril(torch.ones_like(allowed))
    assert int(masked_pairs.sum()) > 0
    assert float(weights["masked"][..., masked_pairs].abs().max()) == 0.0
    assert float(weights["plain"][..., masked_pairs].abs().min()) > 0.0


def test_sft_applies_the_mask_to_the_configured_fraction_of_steps(tiny_dir, make_cfg, demo_tasks):
    from actors.scripted_engine import scripted_trajectories
    from learner.sft import SftModel, run_sft, to_samples

    cfg = _cfg(make_cfg, "trainer.sft_decoupled_mask_frac=0.5")
    sm = SftModel(cfg, tiny_dir)
    samples = to_samples(scripted_trajectories(demo_tasks[:1], sm.processor, cfg, 1), sm.processor, sm.image_token_id)
    history = run_sft(sm, samples, 8, seed=3)
    used = [h["sft/decoupled_mask"] for h in history]
    assert 0 < sum(used) < len(used) and all(np.isfinite(h["sft/loss"]) for h in history)


def test_weft_pretrain_vision_teaches_a_random_model_to_name_the_colour(seeing_model, tiny_dir):
    """`weft pretrain-vision` (conftest's `seeing_model`, 150 steps): a random tiny model learns to caption
    synthetic flash frames. Teacher-forced on 64 fresh examples, "a <colour>" (or "nothing") opens the
    caption's argmax far more often after than before (0.0 -> 0.81 after 80 steps when measured)."""
    from models.hf import load_hf_model

    out, summary = seeing_model
    assert summary["steps"] == 150 and summary["examples"] == 1200 and summary["held_out"] == 64, summary
    assert summary["caption_opening_accuracy_before"] < 0.2, summary
    assert summary["caption_opening_accuracy_after"] >= 0.8, summary
    assert summary["loss_last"] < summary["loss_first"] / 4, summary
    tuned, base = load_hf_model(out), load_hf_model(tiny_dir)
    assert not torch.equal(tuned.model.visual.patch_embed.proj.weight, base.model.visual.patch_embed.proj.weight)
    assert (out / "tokenizer.json").is_file() and (out / "processor_config.json").is_file()


def test_sft_freeze_vision_trains_the_language_model_and_leaves_the_tower(tiny_dir, make_cfg, demo_tasks):
    """trainer.sft_freeze_vision: after SFT steps every `model.visual` parameter (tower and merger) is
    bit-identical and none is in the optimizer; the language model's weights moved."""
    from actors.scripted_engine import scripted_trajectories
    from learner.sft import SftModel, run_sft, to_samples

    cfg = _cfg(make_cfg, "trainer.sft_freeze_vision=true")
    sm = SftModel(cfg, tiny_dir)
    visual = dict(sm.model.model.visual.named_parameters())
    assert sm.frozen == sum(p.numel() for p in visual.values()) > 0
    before = {k: p.detach().clone() for k, p in sm.model.named_parameters()}
    samples = to_samples(scripted_trajectories(demo_tasks[:2], sm.processor, cfg, 2), sm.processor, sm.image_token_id)
    run_sft(sm, samples, 2)
    in_optimizer = {id(p) for g in sm.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in visual.values()}
    for name, p in sm.model.named_parameters():
        if ".visual." in f".{name}":
            assert torch.equal(p, before[name]), name
    assert not torch.equal(sm.model.lm_head.weight, before["lm_head.weight"])
