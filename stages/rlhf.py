"""Stage 4, rlhf: reinforcement learning of the SFT policy against its reward sources,
with a KL penalty to the SFT reference: PPO with a value model (Ziegler et al. 2019;
InstructGPT §3.5) by default, or a critic-free group estimator (GRPO, RLOO,
REINFORCE++-baseline, Dr. GRPO) over K answers per prompt.

This module is the stage: its settings, the checks of its inputs before anything
runs, and reading them into an `engine.driver.Job`. The loop itself is
`engine.driver.train` (rollout, rewards, advantages, update, bookkeeping); the math
is in rl/ (the estimators in rl/advantages.py), the model side in engine/, the reward
sources' checks in stages/rlhf_rewards.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import ConfigError, SettingError, setting
from stages.rlhf_rewards import RUN_RM, RewardSpec, check_rewards, kind
from stages.shared import data
from stages.shared.judge import load_callable, reward_stats
from stages.shared.settings import LoraSettings, check_loggers, check_lora, check_model_folder


@dataclass(frozen=True)
class RlhfData:
    prompts: str = setting("configs/data/demo_prompts.jsonl", path="local-or-hub")
    """Prompts to roll out: rows with "prompt" (text or messages) or "messages"."""
    eval_prompts: str | None = setting(None, path="local-or-hub")
    """Held-out prompts scored before and after; null holds out `eval_fraction` of `prompts`."""
    eval_fraction: float = 0.125
    ptx: str | None = setting(None, path="local-or-hub")
    """Prompt-response rows for PPO-ptx (InstructGPT's language-modelling mix); needs ptx_coef > 0."""

    def __post_init__(self):
        if not 0 < self.eval_fraction < 1:
            raise SettingError("eval_fraction", f"must be between 0 and 1, got {self.eval_fraction}")


@dataclass(frozen=True)
class GuardSettings:
    """Stop the run early (keeping the policy of that step) when it starts gaming its
    reward. Off unless `audit` or `min_length` is set (engine/guard.py)."""

    audit: str | None = None
    """An audit reward source's name: stop when, over `window` steps, the train reward
    rises while this source's mean falls."""
    window: int = 5
    min_length: float | None = None
    """Stop when the responses average fewer tokens than this over `window` steps (collapse)."""

    def __post_init__(self):
        if self.window < 2:
            raise SettingError("window", f"must be at least 2 (a trend needs two steps), got {self.window}")
        if self.min_length is not None and self.min_length <= 0:
            raise SettingError("min_length", f"must be positive (or null for off), got {self.min_length}")


@dataclass(frozen=True)
class RlhfConfig:
    init_from: str | None = setting(None, path="local", fingerprint=False)
    """Policy (and reference) folder instead of the run's SFT checkpoint."""
    reward_model: str | None = setting(None, path="local", fingerprint=False)
    """Any one-label sequence-classification folder instead of the run's RM checkpoint."""
    data: RlhfData = RlhfData()
    method: Literal["full", "lora"] = "full"
    """lora: the policy is an adapter on one frozen copy of the SFT weights, which is also the
    reference; the value is another adapter on it, or on the frozen reward model (value_model)."""
    lora: LoraSettings = LoraSettings()
    value_model: Literal["separate", "reward", "shared"] = "separate"
    """separate: the value is its own model (full: a copy of the reward model, as in
    InstructGPT) or its own adapter on the policy's frozen weights (lora), under the
    reward model's head. reward (lora): the value is an adapter on the frozen reward
    model itself, so it starts as exactly the reward model, and with value_layers it
    reuses the reward model's forward below them. shared: a value head on the policy's
    last hidden states, one forward and one backward fewer per step, at the cost of
    policy and value sharing features."""
    value_layers: int | None = None
    """LoRA, separate or reward value: the value adapter covers only the top N decoder
    layers, so its backward stops there (and holds their activations only); with
    value_model reward its forward runs only those layers too. null: every layer."""
    merge_for_sampling: bool = True
    """LoRA: sample with the policy adapter folded into a temporary copy of the weights it
    adapts, one matmul per layer instead of three; costs that copy's memory while sampling."""
    steps: int = 100
    """PPO steps; each rolls out `batch_size` prompts per process and updates on them."""
    batch_size: int = 8
    minibatch_size: int = 8
    """Episodes per optimiser step; divides batch_size."""
    microbatch_size: int = 8
    """Episodes per forward/backward (gradient accumulation inside a minibatch); divides minibatch_size."""
    advantage: Literal["gae", "grpo", "rloo", "reinforce_baseline", "dr_grpo"] = "gae"
    """The advantage estimator, by name in rl/advantages.py's ESTIMATORS. gae: PPO with a
    value model (advantages whitened). The critic-free ones need samples_per_prompt >= 2
    and build, train and save no value model: grpo (group mean and std), dr_grpo (group
    mean, no std, constant loss normaliser), rloo (leave-one-out mean),
    reinforce_baseline (group mean of the score, then whitened over the batch)."""
    samples_per_prompt: int = 1
    """K answers sampled for each prompt, as one batch; batch_size counts answers, so a
    step rolls out batch_size / K prompts per process. A group is sampled, scored and
    baselined on one process, and shares its prompt in every packed forward."""
    kl_penalty: Literal["reward", "loss"] | None = None
    """Where the KL to the reference goes: shaped into the per-token reward, or a loss
    term beside the policy loss. null: the estimator's choice (gae, rloo: reward, as
    InstructGPT and TRL's RLOO; grpo, dr_grpo, reinforce_baseline: loss, as DeepSeekMath,
    TRL's GRPO and OpenRLHF)."""
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    """The KL estimator of the loss term (rl/kl.py). null: the estimator's (grpo, dr_grpo:
    k3; reinforce_baseline: k2). The reward shaping always uses k1, the exact log ratio."""
    kl_bias_correction: bool | None = None
    """With the KL as a loss term: weigh each token's KL by pi / pi_old, 1 in value but
    not in gradient, which makes the term's gradient the reverse KL's rather than the
    estimator's own (DeepSeek-V3.2; TRL's use_bias_correction_kl, on by default in
    TRL 1.16). null: the estimator's (grpo, dr_grpo: true, as TRL; reinforce_baseline:
    false, as OpenRLHF). Not for a KL shaped into the reward."""
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant", "sequence_sum"] | None = None
    """How the per-token loss is averaged: over every token of the microbatch, per answer
    then over answers (GRPO's paper), summed over max_new_tokens per answer (Dr. GRPO), or
    summed per answer, then averaged over answers (RLOO's paper and TRL's RLOOTrainer: the
    whole answer is one action). null: the estimator's."""
    rewards: tuple[RewardSpec, ...] = (RewardSpec(source="rm"),)
    """The reward sources: reward-model folders ("rm" is the run's) and functions
    `module:function` rating a batch of (prompt, completion) pairs, each with a weight
    and a role (train or audit); see stages/rlhf_rewards.py."""
    guard: GuardSettings = GuardSettings()
    ppo_epochs: int = 4
    """With 1, and microbatch_size == batch_size, the rollout skips its policy (and value)
    forward: the update's forward, on the same weights, gives the same numbers."""
    learning_rate: float = 3e-6
    lr_scheduler: Literal["linear", "constant"] = "linear"
    """linear anneals to 0 at the last step."""
    max_prompt_length: int = 256
    max_new_tokens: int = 53
    temperature: float = 0.7
    top_k: int = 0
    """0: off. Anything but plain temperature sampling biases the KL estimate (it can go negative)."""
    top_p: float = 1.0
    kl_coef: float = 0.05
    """Initial coefficient of the per-token KL penalty."""
    kl_target: float | None = None
    """Set to adapt kl_coef toward this KL per episode (Ziegler et al.'s controller); null keeps it fixed."""
    kl_horizon: int = 10000
    normalize_scores: bool = True
    """false: no reward source is standardised (each one's own `normalize` is ignored)."""
    score_clip: float | None = None
    """Clip (normalised) scores to +-this."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of a response that never ends."""
    whiten_rewards: bool = False
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    ptx_coef: float = 0.0
    max_grad_norm: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    activation_checkpointing: bool = setting(False, fingerprint=False)
    """Recompute the policy's layer activations in the backward instead of keeping them:
    less memory in the update, one more forward pass; the same gradients."""
    save_steps: int = setting(10, fingerprint=False)
    sample_steps: int = setting(10, fingerprint=False)
    """Steps between rollout samples written to samples.jsonl."""
    eval_batch_size: int = setting(16, fingerprint=False)
    num_samples: int = setting(4, fingerprint=False)
    judge: str | None = setting(None, fingerprint=False)
    """Replaced by an audit reward source: rewards: [{source: rm}, {source: demo.rewards:gold, role: audit}]."""
    report_to: tuple[str, ...] = setting(("none",), fingerprint=False)
    """Trackers accelerate logs to, besides metrics.jsonl: tensorboard, wandb, ..."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "minibatch_size", "microbatch_size", "ppo_epochs", "max_prompt_length", "max_new_tokens", "save_steps", "sample_steps", "eval_batch_size", "kl_horizon"):
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.minibatch_size:
            raise SettingError("minibatch_size", f"must divide batch_size ({self.batch_size}), got {self.minibatch_size}")
        if self.minibatch_size % self.microbatch_size:
            raise SettingError("microbatch_size", f"must divide minibatch_size ({self.minibatch_size}), got {self.microbatch_size}")
        self._check_coefficients()
        if not any(spec.role == "train" for spec in self.rewards):  # (check_rewards says it too, for callers without a config file)
            raise SettingError("rewards", "no source has role train; at least one must make the reward")
        if self.value_model == "reward" and self.method != "lora":
            raise SettingError("value_model", "reward needs method: lora (with full, separate already starts the value as a copy of the reward model)")
        if self.value_layers is not None and self.value_layers < 1:
            raise SettingError("value_layers", f"must be at least 1 (or null for every layer), got {self.value_layers}")
        if self.ptx_coef > 0 and self.data.ptx is None:
            raise SettingError("ptx_coef", "needs data.ptx (prompt-response rows to keep modelling)")
        if self.judge is not None:
            raise SettingError("judge", f"is now an audit reward source: rewards: [{{source: rm}}, {{source: {_batch_judge(self.judge)}, role: audit, name: gold}}]")
        self._check_groups()

    def _check_coefficients(self):
        for name in ("learning_rate", "temperature", "clip_range", "clip_range_value", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise SettingError(name, f"must be positive, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise SettingError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.kl_coef < 0:
            raise SettingError("kl_coef", f"must be >= 0 (0 is no KL penalty), got {self.kl_coef}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise SettingError("kl_target", "must be positive (or null for a fixed kl_coef)")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise SettingError(name, f"must be in [0, 1], got {getattr(self, name)}")
        for name in ("missing_eos_penalty", "vf_coef", "ptx_coef"):
            if getattr(self, name) < 0:
                raise SettingError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.score_clip is not None and self.score_clip <= 0:
            raise SettingError("score_clip", f"must be positive (or null for no clipping), got {self.score_clip}")

    def _check_groups(self):
        from rl.advantages import ESTIMATORS

        if self.samples_per_prompt < 1:
            raise SettingError("samples_per_prompt", f"must be at least 1, got {self.samples_per_prompt}")
        if self.batch_size % self.samples_per_prompt:
            raise SettingError("samples_per_prompt", f"must divide batch_size ({self.batch_size}): a step rolls out whole groups, got {self.samples_per_prompt}")
        if ESTIMATORS[self.advantage].needs_groups and self.samples_per_prompt < 2:
            raise SettingError("samples_per_prompt", f"must be at least 2 for advantage {self.advantage} (the group is the baseline), got {self.samples_per_prompt}")
        if self.kl_bias_correction and self.kl_in_reward():
            raise SettingError("kl_bias_correction", f"weighs a KL loss term, and advantage {self.advantage} here shapes the KL into the reward; set kl_penalty: loss or drop it")

    def kl_in_reward(self) -> bool:
        """The KL is shaped into the reward (kl_penalty, else the estimator's choice)."""
        from rl.advantages import ESTIMATORS

        return (self.kl_penalty or ESTIMATORS[self.advantage].kl_penalty) == "reward"

    def unused(self) -> set[str]:
        from rl.advantages import ESTIMATORS

        unused = {"lora", "value_layers", "merge_for_sampling"} if self.method == "full" else set()
        if self.value_model == "shared":
            unused.add("value_layers")
        if not ESTIMATORS[self.advantage].needs_values:
            unused |= {"value_model", "value_layers", "vf_coef", "clip_range_value", "lam"}
        if self.kl_target is None:
            unused.add("kl_horizon")
        if self.kl_in_reward():
            unused.add("kl_bias_correction")  # and a PPO run keeps the fingerprint it had before the setting existed
        return unused


def check(cfg: RlhfConfig) -> None:
    from engine.reward_functions import prompt_text
    from engine.values import LAYOUTS
    from rl.advantages import ESTIMATORS

    check_loggers(cfg.report_to, "rlhf.report_to")
    check_lora(cfg, "rlhf.lora")
    check_model_folder(cfg.init_from, "rlhf.init_from", "causal")
    check_model_folder(cfg.reward_model, "rlhf.reward_model", "classifier")
    prompts = data.read_prompts(cfg.data.prompts, "rlhf.data.prompts")
    training = len(prompts) if cfg.data.eval_prompts is not None else data.rows_left_to_train(len(prompts), cfg.data.eval_fraction, "rlhf.data.prompts")
    check_prompt_count(cfg, training)
    check_rewards(cfg.rewards, "rlhf.rewards", [prompt_text(p) for p in prompts])
    check_reward_folders(cfg)
    names = {spec.metric_name for spec in cfg.rewards if spec.role == "audit"}
    if cfg.guard.audit is not None and cfg.guard.audit not in names:
        raise ConfigError(f"rlhf.guard.audit: {cfg.guard.audit!r} is not an audit reward source (audit sources: {sorted(names) or 'none'})")
    if cfg.data.eval_prompts is not None:
        data.read_prompts(cfg.data.eval_prompts, "rlhf.data.eval_prompts")
    if cfg.data.ptx is not None:
        check_ptx_count(cfg, ptx_rows(cfg))
    layout = LAYOUTS.get((cfg.value_model, cfg.method)) if ESTIMATORS[cfg.advantage].needs_values else None
    if cfg.activation_checkpointing and layout is not None and layout.switches_adapters:
        raise ConfigError(
            f"rlhf.activation_checkpointing: with value_model {cfg.value_model} and method {cfg.method} the value is a second adapter on the policy's layers, "
            "and the backward's recompute would run whichever adapter is active then; use value_model: reward or shared, or turn it off"
        )
    if cfg.top_k or cfg.top_p < 1:
        warnings.warn("rlhf: top_k/top_p sample from a truncated policy, so the KL estimate is biased (it can go negative); plain temperature sampling is exact", stacklevel=2)


def headline(metrics: dict) -> str:
    if not metrics:
        return "-"
    before, after = metrics["eval_before"], metrics["eval_after"]
    return f"held-out score {before['score']:+.3f} -> {after['score']:+.3f}, KL {metrics['final_kl']:.2f}, {metrics['steps']} steps ({metrics['method']})"


def run(cfg: RlhfConfig, inputs: dict[str, Path], out_dir: Path, seed: int) -> dict:
    return train(cfg, inputs["sft"], inputs["rm"], out_dir, seed)


def train(cfg: RlhfConfig, policy_dir: Path, rm_dir: Path, out_dir: Path, seed: int) -> dict:
    """Read and check this run's inputs (prompts, tokenizers, the reward sources with
    their statistics, PPO-ptx rows) into a Job, then run the RL loop on it."""
    from engine import driver
    from stages.shared.training import load_tokenizer

    tokenizer = load_tokenizer(policy_dir)
    prompts = data.read_prompts(cfg.data.prompts, "rlhf.data.prompts", cfg.max_prompt_length, tokenizer)
    if cfg.data.eval_prompts is not None:
        held = data.read_prompts(cfg.data.eval_prompts, "rlhf.data.eval_prompts", cfg.max_prompt_length, tokenizer)
    else:
        prompts, held = data.split_rows(prompts, None, cfg.data.eval_fraction, seed, "rlhf.data.prompts")
    check_prompt_count(cfg, len(prompts))
    rows = ptx_rows(cfg) if cfg.ptx_coef > 0 else None
    if rows is not None:
        check_ptx_count(cfg, rows)
    policy = f"rlhf.init_from: {policy_dir}" if cfg.init_from else str(policy_dir)
    sources = reward_sources(cfg, Path(rm_dir), tokenizer, policy)
    job = driver.Job(Path(policy_dir), Path(out_dir), seed, tokenizer, prompts, held, sources, rows)
    return driver.train(cfg, job)


def reward_sources(cfg: RlhfConfig, rm_dir: Path, tokenizer, policy: str):
    """The configured reward sources as the engine's records: folders checked against the
    policy's tokenizer and given their held-out statistics, functions loaded."""
    from engine.models import check_same_tokenizer
    from engine.rewards import Source, Sources

    sources = []
    for i, spec in enumerate(cfg.rewards):
        key = f"rlhf.rewards[{i}]"
        normalize = spec.normalize and cfg.normalize_scores
        if kind(spec) == "function":
            function = load_callable(spec.source, f"{key}.source")
            sources.append(Source(spec.metric_name, spec.role, spec.weight, normalize, function=function, spec=spec.source))
            continue
        folder, named_by = model_source(cfg, i, rm_dir)
        check_same_tokenizer(tokenizer, folder, named_by, policy)
        stats = normalising_stats(folder, i) if normalize else None
        sources.append(Source(spec.metric_name, spec.role, spec.weight, normalize, model_dir=folder, stats=stats))
    return Sources(sources)


def check_prompt_count(cfg: RlhfConfig, training: int) -> None:
    if training < cfg.batch_size // cfg.samples_per_prompt:
        raise ConfigError(f"rlhf.data.prompts: {training} training prompt(s), fewer than one step's {cfg.batch_size // cfg.samples_per_prompt}")


def check_ptx_count(cfg: RlhfConfig, rows: list[dict]) -> None:
    if cfg.ptx_coef > 0 and len(rows) < cfg.microbatch_size:
        raise ConfigError(f"rlhf.data.ptx: {len(rows)} row(s), fewer than one microbatch ({cfg.microbatch_size})")


def check_reward_folders(cfg: RlhfConfig) -> None:
    """The reward-model folders that exist before the run (not the run's own rm), which
    check_model_folder found to be classifiers: one label, and the statistics normalising
    needs. What needs the policy's tokenizer is checked when the stage starts."""
    from transformers import AutoConfig

    for i, spec in enumerate(cfg.rewards):
        if kind(spec) == "function" or (spec.source == RUN_RM and cfg.reward_model is None):
            continue
        folder, key = model_source(cfg, i, None)
        labels = AutoConfig.from_pretrained(folder).num_labels
        if labels != 1:
            raise ConfigError(f"{key}: {folder} is not a one-label reward model (num_labels={labels})")
        if spec.normalize and cfg.normalize_scores:
            normalising_stats(folder, i)


def model_source(cfg: RlhfConfig, i: int, rm_dir: Path | None) -> tuple[Path, str]:
    """The folder reward source `i` reads (`rm`: rlhf.reward_model, else the run's rm at
    `rm_dir`) and the key that named it, for errors."""
    spec = cfg.rewards[i]
    if spec.source != RUN_RM:
        return Path(spec.source), f"rlhf.rewards[{i}].source"
    return (Path(cfg.reward_model), "rlhf.reward_model") if cfg.reward_model else (Path(rm_dir), f"rlhf.rewards[{i}].source")


def normalising_stats(folder: Path, i: int) -> tuple[float, float]:
    """The held-out mean and std the rm stage stored, which standardising source `i` needs."""
    stats = reward_stats(folder)
    if stats is None:
        raise ConfigError(f"rlhf.rewards[{i}]: {folder} has no reward_mean/reward_std in its manifest (not built by the rm stage); set normalize: false on it")
    return stats


def _batch_judge(judge: str) -> str:
    """What an old `rlhf.judge` becomes as a batch reward function, where the project has one."""
    return {"demo.judge:gold_score": "demo.rewards:gold"}.get(judge, judge)


def ptx_rows(cfg: RlhfConfig) -> list[dict]:
    return [data.sft_example(where, row) for where, row in data.read_rows(cfg.data.ptx, "rlhf.data.ptx")]
