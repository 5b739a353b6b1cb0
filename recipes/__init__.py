"""The seed papers as recipes: each is `configs/recipes/NAME.yaml` plus the plain tools and reward
functions of one file here, named in that config (`env.tools`, `reward.fn`).

* `videozoomer`: `video_zoom(segment, fps)`, 0.9 acc + 0.1 all-turns-parse format.
* `video_o3`: `grounding(temporal_segment, sampling_strategy)`, acc + fmt + Video-o3's R_tool.
* `paravt`: `crop_video(start_time, end_time)` answered by the policy as a sub-agent; tiered tool
  reward and the think-anchor format credit.
* `weaver`: 0.7 acc + 0.2 format + 0.1 tool (gated on a right answer) over the built-in tools.
* `deepeyes`: 0.8 acc + 0.2 format (-1 on an error) + 1.2 [tool used and right].
* `judge`: the judge hook every recipe's reward takes (`judge_url`): open-ended answers scored by a
  model behind an OpenAI-compatible server (vLLM's `vllm serve`).
`common` holds what they share: accuracy (rule or judge) and the turn-shape checks.
"""
