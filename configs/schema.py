"""The typed configuration of weft: one dataclass per part, help text on every field.

Every field carries `metadata={"help": ...}` and, where it has them, bounds
(`"min"`, `"max"`, `"choices"`). `configs.loader.load_config` turns these into
an OmegaConf structured config, merges YAML and `key=value` overrides, checks
the bounds, and hands back plain dataclasses: no DictConfig travels past it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


def f(default: Any = None, help: str = "", *, factory: Any = None, **bounds: Any) -> Any:
    """A dataclass field with help text and optional bounds (min, max, choices)."""
    meta = {"help": help, **bounds}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RewardConfig:
    """The reward: a function of the finished episode returning named terms, and the terms' weights."""

    fn: str = f("env.rewards:default_reward", "The reward function, `module:function`, called as fn(episode, task, **kwargs) -> {term: value} in the env's process (env/rewards.py says what `episode` holds). The default: accuracy, format, tool, evidence, cost.")
    weights: dict[str, float] = f(factory=lambda: {"accuracy": 1.0, "format": 0.2, "tool": 0.1, "evidence": 0.2, "cost": 1.0},
                                  help="Weight of each named term (1 for a term not listed); the reward is the weighted sum and the trajectory records the weighted terms. These defaults are the default function's: a config naming another reward.fn starts from none, and has only the weights it sets.")
    kwargs: dict[str, Any] = f(factory=dict, help="Keyword arguments of the reward function. The default's: format_penalty (0.5, taken off the format term per malformed turn), cost_per_frame (0.0), cost_per_turn (0.0, per turn after the first).")


@dataclass
class EnvConfig:
    """The video-tool environment: overview, tool caps, budgets, decoding."""

    tools: list[str] = f(factory=lambda: ["temporal_zoom", "spatial_zoom", "temporal_search", "get_frame"],
                         help="The tools of a run: built-in names (temporal_zoom, spatial_zoom, temporal_search, get_frame) or `module:attribute` naming an env.Tool, resolved in the process that runs the env.")
    overview_frames: int = f(8, "Frames in the first observation's uniform overview of the whole video.", min=1, max=256)
    overview_fps: Optional[float] = f(None, "If set, the overview samples the video at this rate (frames per second), at most overview_frames frames and at least 1 (VideoZoomer: 0.5 fps, at most 64).", min=0.0)
    last_turn_tools: bool = f(True, "False: the last turn has no tools. The observation before it says so, and a call in it is refused, so the model must answer (VideoZoomer).")
    overview_choices: Optional[list[int]] = f(None, "If set, the overview frame count is drawn per task (seeded by the task id) from this list, e.g. [4, 8, 16, 32] as in ParaVT, so tool calls earn measurable credit.")
    overview_size: list[int] = f(factory=lambda: [160, 90], help="(width, height) of overview frames. Small on purpose: the overview is a coarse map, the tools give detail.")
    zoom_size: list[int] = f(factory=lambda: [320, 180], help="(width, height) of frames returned by temporal_zoom and get_frame.")
    crop_size: list[int] = f(factory=lambda: [224, 224], help="Largest (width, height) of a spatial_zoom crop; the crop keeps its aspect ratio inside this box.")
    max_frames_per_call: int = f(16, "Most frames one temporal_zoom call may return.", min=1, max=256)
    max_pixels_per_frame: int = f(320 * 320, "Most pixels in any frame a tool returns; larger requested sizes are scaled down to fit.", min=64)
    max_turns: int = f(6, "Model turns per episode; the episode is truncated after this many.", min=1)
    max_tool_calls: int = f(8, "Tool calls per episode across all turns; calls beyond it are refused with an error observation.", min=0)
    max_calls_per_turn: int = f(4, "Tool calls in one turn (they run in parallel).", min=1)
    max_frames: int = f(64, "Frames the tools may return in one episode, overview excluded.", min=0)
    search_top_k: int = f(5, "Most results temporal_search returns.", min=1, max=50)
    decode_threads: int = f(2, "Threads that step episodes (and so decode video) in parallel in one env process.", min=1, max=64)
    cache_bytes: int = f(512 * 2**20, "Byte bound of the process-wide decoded-frame LRU cache shared by all episodes.", min=0)
    reader_pool_size: int = f(16, "Open video readers kept per process (LRU).", min=1)
    video_backend: str = f("auto", "Decoder per file: auto (decord when it opens and decodes the file, PyAV otherwise, e.g. AV1; the probe records why), decord, or pyav. The learner re-decodes frames with the same choice.", choices=["auto", "decord", "pyav"])
    seed: int = f(0, "Seed for per-task random choices (overview size draw).")
    num_actors: int = f(1, "EnvActors (Ray actors hosting many episodes) in a `weft train` run; the rollout workers share them. Scales apart from rollout.num_workers: decoding is CPU work.", min=1)
    num_cpus: float = f(0.25, "CPUs Ray reserves for each EnvActor (fractional: it mostly waits on decord threads).", min=0.0)


@dataclass
class LossConfig:
    """GRPO policy loss with decoupled-PPO off-policy correction (see learner/grpo.py)."""

    clip_low: float = f(0.2, "PPO lower clip: the ratio pi/pi_prox is clipped at 1 - clip_low.", min=0.0, max=1.0)
    clip_high: float = f(0.28, "PPO upper clip: the ratio is clipped at 1 + clip_high (clip-higher, DAPO).", min=0.0)
    dual_clip: Optional[float] = f(None, "Dual clip constant c > 1: for negative advantages the loss is capped at -c*A. None disables it.")
    is_mode: str = f("token_tis", "Behaviour-policy correction w = pi_prox/mu: none | token_tis (min(w, is_cap)) | seq_tis | token_mis (mask tokens with w outside [is_low, is_high]) | geo_mask (drop sequences whose geometric-mean w is outside [is_low, is_high]).",
                     choices=["none", "token_tis", "seq_tis", "token_mis", "geo_mask"])
    is_cap: float = f(2.0, "C for truncated importance sampling: w is capped at C.", min=1.0)
    is_low: float = f(0.5, "Lower bound on w for token_mis / geo_mask.", min=0.0)
    is_high: float = f(2.0, "Upper bound on w for token_mis / geo_mask.", min=1.0)
    loss_agg: str = f("token-mean", "Aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (Dr.GRPO, divided by max_len).",
                      choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    max_len: int = f(4096, "Fixed normaliser for seq-mean-token-sum-norm.", min=1)
    policy_loss: str = f("ppo", "Surrogate: ppo (token ratio, clipped) | gspo (GSPO: one ratio per sequence, exp of the mean token log-ratio, clipped as a whole; pair with loss_agg=seq-mean-token-mean and GSPO's small clip ranges) | cispo (CISPO: the clipped ratio as a constant weight on logp, so no token loses its gradient).",
                         choices=["ppo", "gspo", "cispo"])
    entropy_coef: float = f(0.0, "Entropy bonus: minus this times the policy's per-token entropy, aggregated like the loss (VideoZoomer: 0.001).", min=0.0)
    kl_in_reward: float = f(0.0, "KL folded into the reward instead of the loss: each trajectory's reward loses this times the sum over its generated tokens of log(pi_old / pi_ref), before group advantages (Video-o3: 0.001). Loads a frozen reference policy on the learner.", min=0.0)
    kl_coef: float = f(0.0, "Coefficient of the KL penalty to the reference policy; 0 disables it.", min=0.0)
    kl_estimator: str = f("k3", "KL estimator: k1 | k2 | k3 (Schulman's).", choices=["k1", "k2", "k3"])


@dataclass
class DataConfig:
    """Where tasks come from."""

    path: str = f("data/demo/tasks.jsonl", "JSONL task file (one task a line); video paths are relative to it.")
    val_path: Optional[str] = f(None, "Held-out JSONL task file validated during training (trainer.val_every), with the run's agent loop and the eval settings (eval.*); None = no validation.")


@dataclass
class LearnerConfig:
    """The learner's gRPC service (learner/server.py) and the rollout side's client (actors/learner_client.py)."""

    host: str = f("127.0.0.1", "Address the learner binds to. Loopback by default; set 0.0.0.0 (with a token) to take rollout workers from other hosts.")
    port: int = f(0, "TCP port of the learner service; 0 picks a free one (read it back from LearnerServer.port).", min=0, max=65535)
    token: Optional[str] = f(None, "Shared secret every call must carry (metadata 'authorization: Bearer <token>' or 'x-weft-token'); None disables the check. Prefer token_env: this field is saved with the run's config.")
    token_env: Optional[str] = f(None, "Name of an environment variable holding the shared secret, used when token is None.")
    max_message_bytes: int = f(64 * 2**20, "Largest gRPC message either side accepts or sends (one group, one weight chunk); larger ones fail with RESOURCE_EXHAUSTED.", min=2**20, max=2**31 - 1)
    max_workers: int = f(32, "Server threads; each open SubmitGroups or WatchWeights stream holds one, so keep it above 2 x rollout workers.", min=2, max=1024)
    group_size: int = f(8, "G: trajectories per group; a group of any other size is rejected. Must equal the rollout side's group size.", min=1, max=1024)
    buffer_capacity: int = f(64, "Groups the learner buffers between rollout and training; when full, submitters are slowed, never dropped.", min=1)
    max_staleness: int = f(4, "Largest allowed (learner version - version of a group's oldest generated token); older groups are dropped and counted, at submission and again when a batch is taken. 0 = synchronous.", min=0)
    submit_block_s: float = f(10.0, "How long a submission waits for buffer space (the server stops reading the stream, so gRPC slows the sender) before it is acked RETRY_LATER.", min=0.0)
    retry_after_s: float = f(1.0, "Back-off hint sent with RETRY_LATER; the client waits at least this long before resubmitting.", min=0.0)
    dedup_window: int = f(1_000_000, "Group ids remembered for exactly-once submission (oldest forgotten first); part of the checkpointed buffer state.", min=1)
    weight_bucket_bytes: int = f(2**20, "Bytes per weight chunk on WatchWeights: small tensors are packed together, large ones split. At most half of max_message_bytes. 1 MiB and 4 MiB stream a 0.5B bf16 model equally fast on loopback (bench/transport.py); smaller chunks hold less memory in flight.", min=1024)
    vocab_size: Optional[int] = f(None, "If set, token ids must lie in [0, vocab_size); the trainer fills it from the model.", min=1)
    image_token_id: Optional[int] = f(None, "If set, the number of runs of this token in a trajectory must equal its number of media refs.", min=0)
    stop_grace_s: float = f(2.0, "Seconds in-flight calls get to finish when the server stops.", min=0.0)
    backoff_initial_s: float = f(0.1, "Client: first reconnect delay; doubles per failed attempt, with full jitter.", min=0.001)
    backoff_max_s: float = f(5.0, "Client: largest reconnect delay.", min=0.001)
    num_cpus: float = f(0.5, "CPUs Ray reserves for the learner actor in a `weft train` run.", min=0.0)
    num_gpus: float = f(0.0, "GPUs Ray reserves for the learner actor: 1 on a GPU cluster, 0 on the CPU.", min=0.0)
    retry_deadline_s: float = f(600.0, "Client: give up (LearnerUnavailable) after this long without reaching the learner; 0 = never give up.", min=0.0)
    gc_freeze: bool = f(True, "After start-up, move every existing object (torch, the model) to Python's permanent GC generation, so the collections that received groups trigger stop re-walking them (learner/runtime.py).")
    gc_threshold0: int = f(50_000, "Python's gen-0 collection threshold in the learner process (CPython's default 700 collects every few received groups); 0 leaves it alone.", min=0)
    world_size: int = f(1, "Learner ranks: N data-parallel processes that shard the policy with FSDP2 (torch.distributed.fsdp.fully_shard) and form one process group (NCCL on CUDA, gloo on the CPU). 1 = one process, no process group.", min=1)
    placement: str = f("pack", "How Ray places the learner ranks' bundles: pack (as few nodes as possible) | spread (one per node where it can).", choices=["pack", "spread"])
    dist_timeout_s: float = f(1800.0, "Timeout of the learner's collectives (torch.distributed init_process_group); a rank stuck longer fails the learner group, which the driver restarts.", min=10.0)
    malloc_keep_mb: int = f(1024, "glibc: keep up to this many MB of freed heap mapped (M_TRIM_THRESHOLD) and take chunks up to min(this, 32 MB) from the heap (M_MMAP_THRESHOLD), so received groups and weight snapshots reuse pages instead of faulting them in; 0 leaves glibc's defaults.", min=0)


@dataclass
class RolloutConfig:
    """Rollout workers: the vLLM engine, sampling, group size and the agent loop's token budgets."""

    num_workers: int = f(1, "Rollout workers (Ray actors), each owning one engine. Scales apart from env.num_actors.", min=0)
    group_size: int = f(8, "G: episodes per task (one GRPO group); must equal learner.group_size.", min=1, max=1024)
    concurrent_groups: int = f(2, "Groups a worker runs at once (G episodes each) over its one engine.", min=1)
    temperature: float = f(1.0, "Sampling temperature. The engine reports processed logprobs (after temperature and the placeholder ban); the learner divides logits by the same temperature.", min=0.0)
    top_p: float = f(1.0, "Nucleus truncation. Keep 1.0: a truncated distribution cannot be reproduced by the learner, which biases the IS ratio.", min=0.0, max=1.0)
    max_tokens_per_turn: int = f(256, "Generated tokens in one model turn.", min=1)
    max_generated_tokens: int = f(1024, "Generated tokens in one episode; the episode is truncated after.", min=1)
    max_context_tokens: int = f(8192, "Prompt + all turns + observations; must fit max_model_len.", min=16)
    max_model_len: int = f(8192, "vLLM context length.", min=16)
    dtype: str = f("float32", "Engine dtype: float32 on CPU (logprobs match the learner to 1e-6), bfloat16 on GPU.", choices=["float32", "bfloat16", "float16"])
    kv_cache_gib: float = f(1.0, "CPU only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE).", min=0.1)
    gpu_memory_utilization: float = f(0.85, "GPU only: fraction of GPU memory vLLM may take.", min=0.05, max=1.0)
    enable_prefix_caching: bool = f(True, "vLLM prefix caching: the G episodes of a group share one prompt and overview, so their first-turn prefill is paid once.")
    system_prompt: Optional[str] = f(None, "System prompt; None uses models.chat.DEFAULT_SYSTEM_PROMPT.")
    assistant_prefix: str = f("", "Text forced at the start of every assistant turn, e.g. '<think>\\n' (ParaVT's exploration anchoring). Its tokens are prompt (loss mask 0), not policy; the env sees the turn with it.")
    subagent_max_tokens: int = f(512, "Most tokens a sub-agent answer may take (a tool whose call the policy itself answers, e.g. ParaVT's crop_video).", min=1)
    seed: int = f(0, "Seed of the task order and of the engine's sampler.")
    num_cpus: float = f(0.5, "CPUs Ray reserves for each rollout worker (fractional, so a small node fits several).", min=0.0)
    num_gpus: float = f(0.0, "GPUs Ray reserves for each rollout worker: 1 on a GPU cluster (one engine per GPU), 0 on the CPU.", min=0.0)
    min_version_wait_s: float = f(120.0, "How long a worker waits for the weight version a group must start from (the learner's version when the driver handed the group out) before it runs it anyway; such a group may then be dropped as stale, and is counted.", min=0.0)


@dataclass
class TrainerConfig:
    """The learner's training loop (learner/trainer.py), checkpoints, and cold-start SFT (learner/sft.py)."""

    lr: float = f(1e-6, "AdamW learning rate (constant after warmup).", min=0.0)
    warmup_steps: int = f(0, "Steps of linear learning-rate warmup from 0.", min=0)
    betas: list[float] = f(factory=lambda: [0.9, 0.999], help="AdamW (beta1, beta2).")
    eps: float = f(1e-8, "AdamW epsilon.", min=0.0)
    weight_decay: float = f(0.0, "AdamW decoupled weight decay.", min=0.0)
    grad_clip: float = f(1.0, "Clip the global gradient norm to this; 0 disables clipping (the norm is still logged).", min=0.0)
    groups_per_step: int = f(4, "GRPO groups taken from the buffer for one step (must be at most learner.buffer_capacity).", min=1)
    updates_per_step: int = f(1, "Optimizer updates per step: the step's micro-batches are split into this many consecutive mini-batches, all anchored at the proximal policy of the step's start.", min=1)
    micro_batch_tokens: int = f(16384, "Token budget of one micro-batch (padded rows x longest row); a longer trajectory gets a micro-batch of its own.", min=16)
    chunk_size: int = f(1024, "Loss-mask tokens per logits chunk in the fused loss kernel: bounds the [chunk, vocab] fp32 buffers.", min=1)
    adv_mode: str = f("grpo", "Group advantages: grpo ((r - mean) / std) | drgrpo (r - mean).", choices=["grpo", "drgrpo"])
    temperature: float = f(1.0, "Sampling temperature of the rollouts: the learner divides its logits by it, as the engine's processed logprobs do. Must equal rollout.temperature.", min=1e-3)
    dtype: str = f("auto", "Compute dtype: auto (bfloat16 autocast on CUDA, float32 on CPU) | float32 | bfloat16 (autocast; weights and optimizer stay float32).", choices=["auto", "float32", "bfloat16"])
    device: str = f("auto", "auto (cuda when available) | cpu | cuda | cuda:N.")
    publish_dtype: str = f("auto", "Dtype of published weights: auto (rollout.dtype) | float32 | bfloat16 | float16.", choices=["auto", "float32", "bfloat16", "float16"])
    gradient_checkpointing: bool = f(False, "Activation checkpointing of every decoder layer and vision block (recomputed in backward): activations of a layer instead of all layers, for about a third more compute.")
    cpu_offload: bool = f(False, "FSDP2 CPUOffloadPolicy: sharded parameters, gradients and optimizer state live in host memory and the optimizer steps there (CUDA, learner.world_size > 1 only).")
    export_hf: bool = f(True, "At the end of training, write the final weights as an HF model (config.json + safetensors + processor) to run_dir/model, loadable by from_pretrained and vLLM.")
    weight_transport: str = f("grpc", "How weights reach the rollout workers: grpc (LearnerServer.publish; any device) | nccl (torch.distributed broadcast; CUDA only, UNVERIFIED).", choices=["grpc", "nccl"])
    batch_timeout_s: float = f(60.0, "How long one wait for a batch may take before the loop logs that it is starved and waits again.", min=0.1)
    max_skipped_batches: int = f(20, "Stop the run after this many batches in a row left nothing to train on (every group zero-variance or failed), saving a checkpoint and exiting non-zero: the policy scores the same on every episode of every task it draws (all too easy or all too hard), and sampling more groups will not change that (DAPO's max_num_gen_batches). 0 = never stop.", min=0)
    total_steps: int = f(0, "Stop after this many optimizer steps (counting resumed ones); 0 = run until stopped (`weft train` needs it > 0).", min=0)
    sample_every: int = f(10, "Every this many steps, write the step's trajectories to run_dir/trajectories/step_NNNNNN.msgpack (for `weft view`); 0 = never.", min=0)
    checkpoint_every: int = f(50, "Save a checkpoint every this many steps; 0 = only at the end.", min=0)
    keep_checkpoints: int = f(3, "Newest complete checkpoints kept; older ones are deleted after a save.", min=1)
    resume: str = f("auto", "auto (continue from the newest complete checkpoint under run_dir, else start fresh) | never | a checkpoint directory.")
    run_dir: Optional[str] = f(None, "Where everything of a run goes: config.yaml, metrics.jsonl, tb/, checkpoints/, trajectories/. None = runs/<local timestamp> (resolved once at start and saved with the config).")
    tensorboard: bool = f(True, "Also write metrics as TensorBoard events under run_dir/tb.")
    val_every: int = f(0, "Validate on data.val_path every this many steps (and at the last step): training pauses at the step, every validation task runs on the rollout workers with that step's weights, and val/... metrics are logged at that step. 0 = never.", min=0)
    val_before_train: bool = f(False, "Also validate before the first step (step 0: the starting model), when data.val_path is set.")
    train_subagents: bool = f(False, "Also train the sub-agent trajectories an episode's tool calls ran on the policy (ParaVT's crop_video), each with its episode's advantage. Off by default, as ParaVT ships it.")
    sft_lr: float = f(1e-4, "Cold-start SFT learning rate.", min=0.0)
    sft_decoupled_mask_frac: float = f(0.0, "Fraction of SFT steps trained under Video-o3's task-decoupled attention mask (learner/sft.py, decoupled_mask): answer tokens do not see the overview's images, each zoom turn not the earlier clips (Video-o3: 0.1).", min=0.0, max=1.0)
    sft_steps: int = f(100, "Cold-start SFT optimizer steps.", min=1)
    sft_batch_size: int = f(4, "Trajectories per SFT step.", min=1)
    sft_episodes: int = f(32, "Scripted-policy episodes rendered into the SFT data (cycling over the tasks).", min=1)
    sft_no_tools_episodes: int = f(0, "Extra SFT episodes played as the no-tools baseline plays (`weft eval --no-tools`: no tools, one turn, env.overview_frames + env.max_frames uniform frames, eval.no_tools_prompt), so that baseline is in a format the model knows. The oracle answers what it sees in those frames, else guesses.", min=0)
    sft_answer_first_episodes: int = f(0, "Extra SFT episodes, tools offered, that answer in the first turn without calling one. Only the turn's opening up to `<answer>` is trained, never the answer itself: they teach that answering at once is an option and nothing about what to answer without evidence. The cold start then looks only some of the time, and RL is left to learn when looking pays (configs/demo.yaml).", min=0)
    sft_freeze_vision: bool = f(False, "Keep the vision tower and merger fixed in the cold-start SFT, as LLaVA's and Qwen2-VL's instruction-tuning stages do: only the language model learns the format. The demo's tiny model learnt to see in `weft pretrain-vision`; trained with the rest on 64 episodes the tower lost it (configs/demo.yaml).")
    sft_zoom_frames: int = f(4, "Frames the oracle policy asks temporal_zoom for in SFT episodes (fewer = shorter trajectories).", min=1, max=256)
    sft_eval_turns: int = f(16, "Held-out model turns on which `weft sft` measures the valid-action rate before and after; 0 skips it.", min=0)


@dataclass
class EvalConfig:
    """`weft eval` and validation during training: how each task is played and scored (actors/evaluator.py)."""

    samples: int = f(1, "K: episodes per task. Accuracy is mean@K (the mean over tasks of the fraction right); pass@k is reported for k = 1, 2, 4, ... up to K.", min=1, max=1024)
    temperature: float = f(0.0, "Sampling temperature of evaluation episodes; 0 is greedy (then K > 1 repeats the same episode).", min=0.0, max=2.0)
    concurrent_tasks: int = f(4, "Tasks one engine plays at once (K episodes each, sharing their prompt's prefill).", min=1)
    view_episodes: int = f(16, "Episodes drawn in `weft eval`'s viewer page (view.html); 0 writes none.", min=0)
    max_turns: Optional[int] = f(None, "Turn limit of evaluation and validation episodes; None = env.max_turns (Video-o3 trains with 6 and validates with 12).", min=1)
    no_tools_prompt: str = f("You answer questions about a video from the frames you are shown. Give the final answer inside <answer></answer>.", "System prompt of the no-tools baseline (`weft eval --no-tools`): one turn, N uniform frames, an answer.")


@dataclass
class RunConfig:
    """The driver of a `weft train` run (train.py): pools, fault tolerance, what the user sees."""

    display: str = f("auto", "Live progress: auto (a rich live table when stdout is a terminal, one log line per step otherwise) | rich | log | none.", choices=["auto", "rich", "log", "none"])
    max_actor_restarts: int = f(-1, "How often Ray restarts a dead rollout worker or env actor (-1 = always). Groups they were running are run again.", min=-1)
    probe_every_s: float = f(5.0, "Seconds between health probes of the actor pools (dead actors are taken out of service until they answer again).", min=0.1)
    drain_timeout_s: float = f(300.0, "At the end, how long the driver waits for groups still running before it stops the workers; those groups are reported as abandoned.", min=0.0)
    max_learner_restarts: int = f(3, "How often the driver restarts a learner group that lost a rank (it resumes from the newest checkpoint; groups accepted after it are run again). 0 = a lost rank ends the run.", min=0)
    ray_num_cpus: Optional[int] = f(None, "CPUs of the local Ray cluster train.py starts when RAY_ADDRESS is unset (None = all of this machine's). Ignored for an existing cluster.", min=1)


@dataclass
class WeftConfig:
    """Everything a weft run needs."""

    data: DataConfig = f(factory=DataConfig, help="Task data.")
    env: EnvConfig = f(factory=EnvConfig, help="Video-tool environment.")
    reward: RewardConfig = f(factory=RewardConfig, help="Reward term weights.")
    loss: LossConfig = f(factory=LossConfig, help="Policy loss.")
    learner: LearnerConfig = f(factory=LearnerConfig, help="Learner service and its client.")
    rollout: RolloutConfig = f(factory=RolloutConfig, help="Rollout workers and sampling.")
    trainer: TrainerConfig = f(factory=TrainerConfig, help="Training loop, checkpoints and cold-start SFT.")
    eval: EvalConfig = f(factory=EvalConfig, help="Evaluation (`weft eval`) and validation during training.")
    run: RunConfig = f(factory=RunConfig, help="The `weft train` driver: pools, fault tolerance, display.")
    model: Optional[str] = f(None, "HF model directory the run starts from (the tiny demo model, or e.g. a local copy of Qwen2.5-VL-7B-Instruct). `weft train --model` overrides it.")
    seed: int = f(0, "Global seed.")
