"""The PPO driver on accelerate. `train` reads as the algorithm: per step, (1) roll
out, (2) shape rewards, (3) estimate advantages, (4) update, (5) keep the books.
`setup` builds what the loop needs once; engine/ holds the model side, rl/ the math.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import checkpointing, device
from engine.chat import encode_prompt
from engine.checkpointing import Progress, prompt_batch
from engine.metrics import StepRecord, Timer, gold_score, step_metrics
from engine.models import Models, load_models
from engine.output import HeldOut, before_training, evaluate_policy, save_final, write_rollout_samples
from engine.packing import pad_sequences
from engine.probes import layout_for
from engine.ptx import PtxStream, ptx_examples
from engine.rollout import RolloutSettings, make_rollout
from engine.update import Learner, one_pass, policy_forward, ppo_update
from pipeline import checkpoint as ckpt
from pipeline.errors import TrainingDiverged
from pipeline.fallbacks import Fallbacks
from rl.advantages import ESTIMATORS, AdvantageInputs
from rl.rewards import AdaptiveKLController, FixedKLController, ppo_rewards


@dataclass
class Job:
    """A PPO run's inputs, read and checked by the rlhf stage."""

    policy_dir: Path
    rm_dir: Path
    out_dir: Path
    seed: int
    tokenizer: object
    prompts: list[list[dict]]  # chat prompts to roll out
    held: list[list[dict]]  # held-out prompts for the greedy check
    stats: tuple[float, float] | None  # the reward model's held-out mean and std
    judge: Callable[[str, str], float | None] | None = None  # logged as objective/gold_score, never trained on
    ptx_rows: list[dict] | None = None  # SFT rows for PPO-ptx


@dataclass
class Run:
    """What `setup` builds once and the loop reads."""

    accelerator: object
    models: Models
    learner: Learner
    scheduler: object
    kl_ctl: FixedKLController
    progress: Progress
    sampling: RolloutSettings
    held_out: HeldOut
    encoded: list[list[int]]  # the prompts as token ids
    fallbacks: Fallbacks  # said once in the log, listed in the manifest


def train(cfg, job: Job) -> dict:
    run = setup(cfg, job)
    accelerator, progress, tokenizer = run.accelerator, run.progress, job.tokenizer
    resume = ckpt.latest_checkpoint(job.out_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        accelerator.print(f"[rlhf] resuming from {resume} (step {progress.step})")
    history = checkpointing.read_history(job.out_dir / "metrics.jsonl", progress.step)
    eval_before = before_training(run.held_out, job.held, job.out_dir)
    estimate = ESTIMATORS[cfg.advantage].estimate
    world = accelerator.num_processes
    bar = _progress_bar(cfg.steps, progress.step, accelerator.is_main_process)
    first_step = progress.step
    while progress.step < cfg.steps:
        timer = Timer()
        # 1. rollout: sample, score, reference log-probs (old log-probs from the update's forward in one-pass mode)
        chosen = prompt_batch(len(run.encoded), progress.step, cfg.batch_size * world, accelerator.process_index, cfg.batch_size, job.seed)
        queries, query_mask = pad_sequences([run.encoded[i] for i in chosen], tokenizer.pad_token_id, "left", accelerator.device)
        with accelerator.autocast():  # generation calls the inner model, which prepare() did not wrap
            batch = make_rollout(run.models, queries, query_mask, run.sampling, timer, run.fallbacks)
        first_forward = None
        if not run.sampling.policy_pass:
            with timer("update"):
                first_forward = policy_forward(run.learner, batch)
                batch.set_old(first_forward[0].detach(), first_forward[1].detach())
        if not torch.isfinite(batch.scores).all():
            raise TrainingDiverged(f"rlhf: the reward model returned a non-finite score at step {progress.step}; the last good checkpoint is kept in {job.out_dir}")
        # 2. rewards: standardised score at the EOS, missing-EOS penalty, per-token KL penalty
        kl_coef = run.kl_ctl.value
        scores, rewards, non_score, kl = ppo_rewards(batch, cfg, job.stats, kl_coef)
        # 3. advantages
        advantages, returns = estimate(AdvantageInputs(rewards, batch.response_mask, batch.values), cfg)
        # 4. update
        with timer("update"):
            update_stats = ppo_update(run.learner, batch, advantages, returns, first_forward)
        run.scheduler.step()
        # 5. bookkeeping: KL controller, metrics, samples, checkpoint
        kl_per_episode = accelerator.reduce(kl.sum(1).mean(), "mean").item()
        run.kl_ctl.update(kl_per_episode, cfg.batch_size * world)
        progress.step += 1
        progress.episodes += cfg.batch_size * world
        record = StepRecord(progress.step, progress.episodes, batch, scores, non_score, kl_per_episode, kl_coef, update_stats, run.scheduler.get_last_lr()[0], timer)
        row = step_metrics(accelerator, record)
        if job.judge is not None:
            row["objective/gold_score"] = gold_score(accelerator, job.judge, tokenizer, [job.prompts[i] for i in chosen], batch)
        history.append(row)
        _log_step(run, job, cfg, row, (batch, scores))
        bar.update(1)
        bar.set_postfix(score=f"{row['objective/scores']:+.3f}", kl=f"{row['objective/kl']:.3f}")
        if progress.step % cfg.save_steps == 0 or progress.step == cfg.steps:
            checkpointing.save_checkpoint(accelerator, job.out_dir, progress.step)
    bar.close()
    return finish(run, cfg, job, history, (eval_before, progress.step - first_step))


def setup(cfg, job: Job) -> Run:
    """The accelerator, the models, the optimiser and everything else fixed for the run."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from transformers import GenerationConfig

    job.out_dir.mkdir(parents=True, exist_ok=True)
    precision = device.mixed_precision(cfg.precision)
    accelerator = Accelerator(
        cpu=device.cpu_only(),
        mixed_precision="no" if precision == "fp32" else precision,
        log_with=[r for r in cfg.report_to if r != "none"] or None,
        project_dir=str(job.out_dir),
    )
    note = Fallbacks("rlhf", accelerator.print)
    set_seed(job.seed, device_specific=True)  # each process samples its own responses
    models = load_models(cfg, job.policy_dir, job.rm_dir, job.stats[1] if job.stats else 1.0, note)
    set_seed(job.seed, device_specific=True)  # the rollouts do not depend on how many adapter weights the layout drew
    trainable = [p for p in models.trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, eps=1e-5)  # eps as in the N+ details (TF Adam)
    schedule = (lambda step: 1.0 - step / cfg.steps) if cfg.lr_scheduler == "linear" else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    wrapped, optimizer, scheduler = accelerator.prepare(models.trained, optimizer, scheduler)
    models.trained = accelerator.unwrap_model(wrapped)
    checkpointing.checkpoint_trainable_weights_only(accelerator)
    models.reward_model.to(accelerator.device)
    models.reference.to(accelerator.device)
    layout = layout_for(*models.forward_models(), note=note)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target else FixedKLController(cfg.kl_coef)
    progress = Progress()
    accelerator.register_for_checkpointing(kl_ctl, progress)
    ptx = None
    if job.ptx_rows is not None and cfg.ptx_coef > 0:
        examples = ptx_examples(job.ptx_rows, job.tokenizer, cfg.max_prompt_length + cfg.max_new_tokens)
        ptx = PtxStream(examples, cfg.microbatch_size, job.tokenizer.pad_token_id, accelerator.device, job.seed, accelerator.process_index, accelerator.num_processes)
        accelerator.register_for_checkpointing(ptx)
    # FSDP and DeepSpeed re-point module weights at their own storage inside every forward,
    # which would undo the folded weights mid-sampling: those sample unmerged.
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    if cfg.method == "lora" and cfg.merge_for_sampling and sharded:
        note("sampling with the LoRA policy unmerged: the weights are sharded (same distribution, slower)")
    generation = GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
        eos_token_id=job.tokenizer.eos_token_id, pad_token_id=job.tokenizer.pad_token_id,
    )
    sampling = RolloutSettings(generation, cfg.temperature, layout, policy_pass=not one_pass(cfg), merge=cfg.merge_for_sampling and not sharded)
    held_out = HeldOut(accelerator, models, job.tokenizer, cfg, job.stats, layout)
    if accelerator.is_main_process:
        accelerator.init_trackers("rlhf", config={"seed": job.seed})
    encoded = [encode_prompt(job.tokenizer, p) for p in job.prompts]
    return Run(accelerator, models, Learner(accelerator, wrapped, optimizer, cfg, layout, ptx), scheduler, kl_ctl, progress, sampling, held_out, encoded, note)


def finish(run: Run, cfg, job: Job, history: list[dict], started: tuple[dict, int]) -> dict:
    """The held-out check after training, the final folders, and the stage's metrics."""
    accelerator, (eval_before, steps_this_attempt) = run.accelerator, started
    eval_after = evaluate_policy(run.held_out, job.held, keep_text=cfg.num_samples)
    accelerator.print(f"[rlhf] held-out score {eval_before['score']:+.3f} -> {eval_after['score']:+.3f}")
    save_final(accelerator, run.models.trained, job.tokenizer, job.out_dir, eval_before, eval_after)
    for tracker in accelerator.trackers:  # not end_training(): it would tear down the process group the runner still uses
        tracker.finish()
    last = history[-1] if history else {}
    return {
        "method": cfg.method,
        "steps": run.progress.step,
        "steps_last_attempt": steps_this_attempt,
        "episodes": run.progress.episodes,
        "train_prompts": len(job.prompts),
        "eval_prompts": len(job.held),
        "eval_before": {k: v for k, v in eval_before.items() if k != "samples"},
        "eval_after": {k: v for k, v in eval_after.items() if k != "samples"},
        "final_kl": last.get("objective/kl", 0.0),
        "final_kl_coef": run.kl_ctl.value,
        "mean_scores_first": history[0]["objective/scores"] if history else None,
        "mean_scores_last": last.get("objective/scores"),
        "seconds_per_step": sum(h["time/step"] for h in history) / len(history) if history else None,
        "reward_normalisation": {"mean": job.stats[0], "std": job.stats[1]} if job.stats else None,
        "trainable_parameters": sum(p.numel() for p in run.models.trained.parameters() if p.requires_grad),
        "fallbacks": run.fallbacks.taken,
    }


def _log_step(run: Run, job: Job, cfg, row: dict, sample: tuple) -> None:
    """metrics.jsonl, the trackers, and rollout samples every sample_steps (main process)."""
    if not run.accelerator.is_main_process:
        return
    with open(job.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    run.accelerator.log(row, step=row["step"])
    if (row["step"] - 1) % cfg.sample_steps == 0:
        write_rollout_samples(job.out_dir, job.tokenizer, *sample, row["step"])


def _progress_bar(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="rlhf", disable=not enabled, dynamic_ncols=True)
