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
