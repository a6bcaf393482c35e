"""The RL driver on accelerate, for PPO and the critic-free estimators alike. `train`
reads as the algorithm: per step, (1) roll out, (2) rate and shape rewards, (3)
estimate advantages, (4) update, (5) keep the books. `setup` builds what the loop
needs once; engine/ holds the model side, rl/ the math.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import checkpointing, device, guard, sharding
from engine.chat import encode_prompt
from engine.checkpointing import Progress, prompt_batch
from engine.metrics import StepRecord, Timer, step_metrics
from engine.models import Models, load_models, load_reward_model
from engine.output import HeldOut, before_training, evaluate_policy, save_final, write_rollout_samples
from engine.packing import pad_sequences
from engine.probes import layout_for
from engine.ptx import PtxStream, ptx_examples
from engine.rewards import Sources, attach_models, episode_texts
from engine.rollout import RolloutSettings, make_rollout
from engine.sharding import built_whole, plain_copy, whole
from engine.update import Learner, Objective, one_pass, policy_forward, ppo_update
from pipeline import checkpoint as ckpt
from pipeline.errors import TrainingDiverged
from pipeline.fallbacks import Fallbacks
from rl.advantages import ESTIMATORS, AdvantageInputs
from rl.rewards import AdaptiveKLController, FixedKLController, ppo_rewards


@dataclass
class Job:
    """An RL run's inputs, read and checked by the rlhf stage."""

    policy_dir: Path
    out_dir: Path
    seed: int
    tokenizer: object
    prompts: list[list[dict]]  # chat prompts to roll out
    held: list[list[dict]]  # held-out prompts for the greedy check
    sources: Sources  # the reward sources (engine/rewards.py); the first reward-model source is the primary
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
    accelerator, progress, objective = run.accelerator, run.progress, run.learner.objective
    resume = ckpt.latest_checkpoint(job.out_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        accelerator.print(f"[rlhf] resuming from {resume} (step {progress.step})")
    history = checkpointing.read_history(job.out_dir / "metrics.jsonl", progress.step)
    eval_before = before_training(run.held_out, job.held, job.out_dir)
    estimate, world, k = ESTIMATORS[cfg.advantage].estimate, accelerator.num_processes, objective.group_size
    # A run the guard stopped, killed before its final save, stays stopped when resumed.
    first_step, stopped = progress.step, guard.verdict(history, cfg.guard)
    # (closed on the way out of an error too, so the error's line starts a line of its own)
    with _progress_bar(cfg.steps, progress.step, accelerator.is_main_process) as bar:
        while progress.step < cfg.steps and stopped is None:
            timer = Timer()
            # 1. rollout: K answers to each of this process's prompts, sampled as one batch and scored by the reward models
            chosen = prompt_batch(len(run.encoded), progress.step, cfg.batch_size // k * world, accelerator.process_index, cfg.batch_size // k, job.seed)
            chosen = [i for i in chosen for _ in range(k)]
            queries, query_mask = pad_sequences([run.encoded[i] for i in chosen], job.tokenizer.pad_token_id, "left", accelerator.device)
            with accelerator.autocast(), whole(accelerator, run.models.trained):  # generation calls the inner model, which prepare() did not wrap
                batch = make_rollout(run.models, queries, query_mask, run.sampling, timer, run.fallbacks)
            first_forward = None
            if not run.sampling.policy_pass:
                with timer("update"):
                    first_forward = policy_forward(run.learner, batch)
                    batch.set_old(first_forward[0].detach(), first_forward[1].detach() if first_forward[1] is not None else None)
            # 2. rewards: every source rated, the train ones standardised and summed; missing-EOS penalty; KL shaped in (or kept for the loss)
            kl_coef = run.kl_ctl.value
            with timer("scoring"):
                rate_rollout(run, job, batch, [job.prompts[i] for i in chosen])
            scores, rewards, non_score, kl = ppo_rewards(batch, cfg, 0.0 if objective.kl_in_loss else kl_coef)
            # 3. advantages
            advantages, returns = estimate(AdvantageInputs(rewards, batch.response_mask, batch.values, scores, batch.rated, k), cfg)
            # 4. update
            with timer("update"):
                update_stats = ppo_update(run.learner, batch, advantages, returns, first_forward, kl_coef=kl_coef)
            run.scheduler.step()
            # 5. bookkeeping: KL controller, metrics, samples, checkpoint, the guard
            kl_per_episode = accelerator.reduce(kl.sum(1).mean(), "mean").item()
            run.kl_ctl.update(kl_per_episode, cfg.batch_size * world)
            progress.step += 1
            progress.episodes += cfg.batch_size * world
            record = StepRecord(progress.step, progress.episodes, batch, scores, non_score, kl_per_episode, kl_coef, update_stats, run.scheduler.get_last_lr()[0], timer)
            history.append(step_metrics(accelerator, record, job.sources))
            _log_step(run, job, cfg, history[-1], (batch, scores))
            bar.update(1)
            bar.set_postfix(score=f"{history[-1]['objective/scores']:+.3f}", kl=f"{history[-1]['objective/kl']:.3f}")
            stopped = guard.verdict(history, cfg.guard)
            if progress.step % cfg.save_steps == 0 or progress.step == cfg.steps or stopped is not None:
                checkpointing.save_checkpoint(accelerator, job.out_dir, progress.step)
    return finish(run, cfg, job, history, (eval_before, progress.step - first_step, stopped))


def rate_rollout(run: Run, job: Job, batch, chat_prompts: list[list[dict]]) -> None:
    """Every reward source's rating of the rollout (`batch.ratings`), and the train
    reward from them (`batch.scores`, `batch.rated`), alike on every process."""
    sources, accelerator = job.sources, run.accelerator
    if not torch.isfinite(batch.ratings).all():
        raise TrainingDiverged(f"rlhf: a reward model returned a non-finite score at step {run.progress.step + 1}; the last good checkpoint is kept in {job.out_dir}")
    texts = episode_texts(job.tokenizer, chat_prompts, batch.responses, batch.response_mask) if sources.needs_text else None
    batch.ratings = sources.rate(batch.ratings, texts)
    everyone = accelerator.gather(batch.ratings) if sources.moments else None
    batch.scores, batch.rated = sources.train_reward(batch.ratings, everyone)


def setup(cfg, job: Job) -> Run:
    """The accelerator, the models, the optimiser and everything else fixed for the run."""
    from accelerate.utils import set_seed
    from transformers import GenerationConfig

    job.out_dir.mkdir(parents=True, exist_ok=True)
    accelerator, note = _accelerator(cfg, job)
    # The same seed on every process while the models are built: new weights (LoRA
    # adapters, heads) start alike everywhere. DDP would copy the main process's over
    # anyway; FSDP2 copies nothing and would shard a mix of different initialisations.
    set_seed(job.seed)
    with built_whole():  # DeepSpeed's engine partitions the trained module itself (ZeRO-3); the frozen ones stay whole
        models = _load_models(cfg, job, note)
        models.scorers = attach_models(job.sources, models.reward_model, load_reward_model)
    set_seed(job.seed, device_specific=True)  # each process samples its own responses, whatever the layout drew
    trainable = [p for p in models.trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, eps=1e-5)  # eps as in the N+ details (TF Adam)
    schedule = (lambda step: 1.0 - step / cfg.steps) if cfg.lr_scheduler == "linear" else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # The loop steps the schedule once per PPO step. Prepared, accelerate would step it once
    # per process each time (the rate would reach zero after steps / processes, then turn
    # negative) and DeepSpeed once per optimiser step, so it is only checkpointed.
    wrapped, optimizer = accelerator.prepare(models.trained, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    models.trained = accelerator.unwrap_model(wrapped)
    checkpointing.checkpoint_trainable_weights_only(accelerator)
    for scorer in models.scorers:
        scorer.to(accelerator.device)
    models.reference.to(accelerator.device)
    with whole(accelerator, models.trained):
        layout = layout_for(*models.forward_models(), note=note)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target else FixedKLController(cfg.kl_coef)
    progress = Progress()
    accelerator.register_for_checkpointing(kl_ctl, progress)
    if job.sources.moments:
        accelerator.register_for_checkpointing(job.sources)
    ptx = None
    if job.ptx_rows is not None and cfg.ptx_coef > 0:
        examples = ptx_examples(job.ptx_rows, job.tokenizer, cfg.max_prompt_length + cfg.max_new_tokens)
        ptx = PtxStream(examples, cfg.microbatch_size, job.tokenizer.pad_token_id, accelerator.device, job.seed, accelerator.process_index, accelerator.num_processes)
        accelerator.register_for_checkpointing(ptx)
    # FSDP and ZeRO-3 re-point module weights at their own storage when they gather, which
    # would undo the folded weights mid-sampling: those sample unmerged. ZeRO-1/2 keep them whole.
    sharded = sharding.weights_sharded(accelerator)
    if cfg.method == "lora" and cfg.merge_for_sampling and sharded:
        note("sampling with the LoRA policy unmerged: the weights are sharded (same distribution, slower)")
    generation = GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
        eos_token_id=job.tokenizer.eos_token_id, pad_token_id=job.tokenizer.pad_token_id,
    )
    sampling = RolloutSettings(generation, cfg.temperature, layout, policy_pass=not one_pass(cfg), merge=cfg.merge_for_sampling and not sharded)
    held_out = HeldOut(accelerator, models, job.tokenizer, cfg, job.sources, layout)
    if accelerator.is_main_process:
        accelerator.init_trackers("rlhf", config={"seed": job.seed})
    encoded = [encode_prompt(job.tokenizer, p) for p in job.prompts]
    learner = Learner(accelerator, wrapped, optimizer, cfg, layout, objective(cfg), ptx)
    return Run(accelerator, models, learner, scheduler, kl_ctl, progress, sampling, held_out, encoded, note)


def _accelerator(cfg, job: Job):
    """The run's accelerator, and its fallbacks (which start with a sharding the launch
    asked for and accelerate dropped)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = device.mixed_precision(cfg.precision)
    # A Trainer stage earlier in this process (`run sft rlhf`) left accelerate's shared
    # state at its own precision, which this Accelerator may not change; the Trainer resets
    # it the same way. The process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        # accelerate runs DeepSpeed only when not told cpu; DeepSpeed finds its own accelerator (its CPU one included)
        cpu=device.cpu_only() and not device.asked_for("DEEPSPEED"),
        mixed_precision="no" if precision == "fp32" else precision,
        gradient_accumulation_steps=cfg.minibatch_size // cfg.microbatch_size,
        log_with=[r for r in cfg.report_to if r != "none"] or None,
        project_dir=str(job.out_dir),
    )
    if accelerator.state.deepspeed_plugin is not None:
        # DeepSpeed clips inside its engine and asks for a batch size accelerate would
        # otherwise read from a dataloader, which PPO does not have.
        accelerator.state.deepspeed_plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=cfg.microbatch_size, gradient_clipping=cfg.max_grad_norm)
    note = Fallbacks("rlhf", accelerator.print)
    for dropped in device.dropped_sharding(accelerator):
        note(dropped)
    return accelerator, note


def _load_models(cfg, job: Job, note) -> Models:
    primary = job.sources.models[0] if job.sources.models else None
    return load_models(cfg, job.policy_dir, primary.model_dir if primary else None, primary.stats[1] if primary and primary.stats else 1.0, note)


def objective(cfg) -> Objective:
    """The loss's choices: the settings where given, else the estimator's (rl/advantages.py)."""
    estimator = ESTIMATORS[cfg.advantage]
    return Objective(
        kl_in_loss=not cfg.kl_in_reward(),
        kl_estimator=cfg.kl_estimator or estimator.kl_estimator,
        aggregation=cfg.loss_aggregation or estimator.aggregation,
        kl_bias_correction=estimator.kl_bias_correction if cfg.kl_bias_correction is None else cfg.kl_bias_correction,
        group_size=cfg.samples_per_prompt,
    )


def finish(run: Run, cfg, job: Job, history: list[dict], started: tuple[dict, int, str | None]) -> dict:
    """The held-out check after training, the final folders, and the stage's metrics."""
    accelerator, (eval_before, steps_this_attempt, stopped) = run.accelerator, started
    if stopped is not None:
        accelerator.print(f"[rlhf] stopped early at step {run.progress.step} of {cfg.steps}: {stopped}")
    eval_after = evaluate_policy(run.held_out, job.held, keep_text=cfg.num_samples)
    accelerator.print(f"[rlhf] held-out score {eval_before['score']:+.3f} -> {eval_after['score']:+.3f}")
    final = plain_copy(accelerator, run.models.trained, lambda: _load_models(cfg, job, run.fallbacks).trained)
    with built_whole():  # the main process alone builds the final folders' plain models
        save_final(accelerator, final, job.tokenizer, job.out_dir, eval_before, eval_after)
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
        "advantage": cfg.advantage,
        "samples_per_prompt": cfg.samples_per_prompt,
        "objective": vars(run.learner.objective),
        "stopped_early": stopped,
        "reward_sources": [{"name": s.name, "role": s.role, "weight": s.weight, "normalisation": s.stats or ("running" if s.name in job.sources.moments else None)} for s in job.sources.sources],
        "trainable_parameters": sum(p.numel() for p in run.models.trained.parameters() if p.requires_grad),
        "precision": device.mixed_precision(cfg.precision),
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
