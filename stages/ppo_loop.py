"""The PPO driver on accelerate: models, the step loop, the update, checkpoints.

Everything that decides a number is in stages/ppo.py; this file moves tensors
between models, processes and disk. Checkpoints are `accelerator.save_state`
folders (trainable weights, optimiser, scheduler, every process's RNG, the KL
controller and the step counter), marked COMPLETE once flushed, so a run killed at any moment
continues from the last one and, on CPU with a fixed seed, ends with the same
weights as a run that was never stopped.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError
from stages import data, evaluation, ppo, ppo_output, rlhf, rollout, training


class Progress:
    """The step counter and the position in the prompt stream, checkpointed with the rest."""

    def __init__(self):
        self.step = 0
        self.episodes = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "episodes": self.episodes}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.episodes = state["step"], state["episodes"]


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def prompt_batch(n_prompts: int, step: int, global_batch: int, rank: int, per_rank: int, seed: int) -> list[int]:
    """Indices of this process's prompts at `step`: epochs of fixed-seed shuffles,
    read in order. A pure function of the step, so a resumed run reads on exactly
    where the killed one stopped."""
    indices = []
    for position in range(step * global_batch + rank * per_rank, step * global_batch + (rank + 1) * per_rank):
        epoch, offset = divmod(position, n_prompts)
        order = list(range(n_prompts))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        indices.append(order[offset])
    return indices


# ---------------------------------------------------------------- models


def load_models(cfg, policy_dir: Path, rm_dir: Path, tokenizer, reward_std: float = 1.0):
    """(PolicyAndValue, reference or None, reward model). Dropout is off everywhere:
    with it, the update's log-probs would differ from the rollout's for no reason.
    The value head starts as the RM's head divided by the RM's std, so its first
    predictions are on the scale of the standardised scores it must learn (exactly
    so for a separate value model, which starts as the RM; a shared head reads the
    policy's features instead)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    def frozen(model):
        model.eval().requires_grad_(False)
        return model

    reward_model = frozen(AutoModelForSequenceClassification.from_pretrained(rm_dir, **_no_dropout(rm_dir)))
    if reward_model.config.num_labels != 1 or not hasattr(reward_model, "score"):
        raise ConfigError(f"{rm_dir}: not a one-label reward model (num_labels={reward_model.config.num_labels})")
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, **_no_dropout(policy_dir))
    shared = cfg.value_model == "shared"
    head = None
    if shared or cfg.method == "lora":
        head = torch.nn.Linear(reward_model.score.in_features, 1, bias=reward_model.score.bias is not None)
        head.load_state_dict(reward_model.score.state_dict())  # the value head starts as the RM's head
        with torch.no_grad():
            head.weight.div_(reward_std)
    if cfg.method == "full":
        reference = frozen(AutoModelForCausalLM.from_pretrained(policy_dir, **_no_dropout(policy_dir)))
        if shared:
            model = rollout.PolicyAndValue(policy, head=head, shared=True)
        else:
            value = AutoModelForSequenceClassification.from_pretrained(rm_dir, **_no_dropout(rm_dir))  # InstructGPT: V starts as the RM
            with torch.no_grad():
                value.score.weight.div_(reward_std)
            model = rollout.PolicyAndValue(policy, value_model=value)
    else:
        from peft import get_peft_model

        lora = training.lora_config(cfg.lora, task_type="CAUSAL_LM")
        lora.lora_dropout = 0.0
        peft_model = get_peft_model(policy, lora, adapter_name="policy")
        reference = None
        if shared:
            model = rollout.PolicyAndValue(peft_model, head=head, lora=True, shared=True)
        else:
            on = reward_model if cfg.value_model == "reward" else policy
            n_layers = on.config.num_hidden_layers
            if cfg.value_layers is not None and cfg.value_layers > n_layers:
                raise ConfigError(f"rlhf.value_layers: {cfg.value_layers} is more than the model's {n_layers} layers")
            # peft honours layers_to_transform only with module-name suffixes, and may have
            # expanded "all-linear" into full paths: name the suffixes the policy adapted.
            value_lora = copy.deepcopy(lora)
            value_lora.target_modules = sorted({name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and "policy" in m.lora_A})
            if cfg.value_layers is not None:
                value_lora.layers_to_transform = list(range(n_layers - cfg.value_layers, n_layers))
            if cfg.value_model == "reward":
                value_lora.task_type = None  # a plain peft wrapper: the RM is called through its backbone and head
                value_lora.base_model_name_or_path = str(rm_dir)
                reward_model = get_peft_model(reward_model, value_lora, adapter_name="value")
                top = cfg.value_layers if cfg.value_layers is not None and rollout.runs_top_layers(reward_model, cfg.value_layers) else None
                if cfg.value_layers is not None and cfg.value_layers < n_layers and top is None:
                    print(f"[rlhf] {rm_dir}: this model cannot run its top {cfg.value_layers} layers alone; the value runs every layer (same numbers, slower)")
                model = rollout.PolicyAndValue(peft_model, value_model=reward_model, head=head, lora=True, value_top=top)
            else:
                peft_model.add_adapter("value", value_lora)
                model = rollout.PolicyAndValue(peft_model, head=head, lora=True)
    model.eval()
    model.use("policy")
    return model, reference, reward_model


def _no_dropout(folder: Path) -> dict:
    """Config overrides that zero every dropout probability the config names."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    return {k: 0.0 for k, v in config.to_dict().items() if "dropout" in k and isinstance(v, float)}


def check_same_tokenizer(tokenizer, rm_dir: Path) -> None:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(rm_dir)
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"{rm_dir}: the reward model's tokenizer differs from the policy's; it would score token ids it does not know (train the RM from this SFT model)")


# ---------------------------------------------------------------- the update


def one_pass(cfg) -> bool:
    """One PPO epoch over one microbatch: the update's only forward runs on the very
    weights that produced the rollout, so its log-probs and values *are* the old ones.
    Taking them from it, rather than from a separate no-grad pass, saves a forward of
    the policy (and of the value model) per step and changes no number."""
    return cfg.ppo_epochs == 1 and cfg.microbatch_size == cfg.batch_size


def policy_forward(model, batch: rollout.Rollout, cfg, ptx, layout: rollout.Layout):
    """The update's forward on `batch`: (logprobs, values, entropy, ptx loss), with grad."""
    ptx_batch = next(ptx) if ptx is not None else None
    with torch.enable_grad():
        return model(batch.pack(layout), cfg.temperature, ptx_batch)


def ppo_update(accelerator, model, optimizer, batch: rollout.Rollout, advantages, returns, cfg, ptx, layout: rollout.Layout, first_forward=None) -> dict[str, float]:
    """`ppo_epochs` passes over the batch in shuffled minibatches, one optimiser step
    each, gradients accumulated over microbatches. `first_forward`, in one-pass mode,
    is the forward already run on the whole batch. Returns mean stats."""
    n_micro = cfg.minibatch_size // cfg.microbatch_size
    totals: dict[str, float] = {}
    count = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.arange(cfg.batch_size, device=batch.responses.device) if first_forward is not None else torch.randperm(cfg.batch_size, device=batch.responses.device)
        for start in range(0, cfg.batch_size, cfg.minibatch_size):
            minibatch = order[start : start + cfg.minibatch_size]
            for micro in range(n_micro):
                index = minibatch[micro * cfg.microbatch_size : (micro + 1) * cfg.microbatch_size]
                mb = batch.select(index)
                sync = micro == n_micro - 1
                with (torch.enable_grad(), accelerator.no_sync(model) if not sync else nullcontext()):
                    if first_forward is not None:
                        (logprobs, values, entropy, ptx_loss), first_forward = first_forward, None
                    else:
                        logprobs, values, entropy, ptx_loss = policy_forward(model, mb, cfg, ptx, layout)
                    pg_loss, pg_stats = ppo.policy_loss(logprobs, mb.logprobs, advantages[index], mb.response_mask, cfg.clip_range)
                    vf_loss, vf_stats = ppo.value_loss(values, mb.values, returns[index], mb.response_mask, cfg.clip_range_value)
                    loss = pg_loss + cfg.vf_coef * vf_loss
                    stats = {"loss/policy": pg_loss, "loss/value": vf_loss, "policy/entropy": ppo.masked_mean(entropy, mb.response_mask), **{f"policy/{k}": v for k, v in pg_stats.items()}, "value/clipfrac": vf_stats["vf_clipfrac"], "value/explained_variance": vf_stats["explained_variance"]}
                    if ptx_loss is not None:
                        loss = loss + cfg.ptx_coef * ptx_loss
                        stats["loss/ptx"] = ptx_loss
                    if not torch.isfinite(loss):
                        raise ConfigError(f"rlhf: the loss became {loss.item()} (policy {pg_loss.item():.4g}, value {vf_loss.item():.4g}); lower learning_rate or check the reward model")
                    accelerator.backward(loss / n_micro)
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
                count += 1
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {key: value / count for key, value in totals.items()}


# ---------------------------------------------------------------- the run


def train(cfg, policy_dir: Path, rm_dir: Path, out_dir: Path, seed: int) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from transformers import AutoTokenizer, GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    precision = training.mixed_precision(cfg.precision)
    accelerator = Accelerator(
        cpu=training.cpu_only(),
        mixed_precision="bf16" if precision["bf16"] else "fp16" if precision["fp16"] else "no",
        log_with=[r for r in cfg.report_to if r != "none"] or None,
        project_dir=str(out_dir),
    )
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ConfigError(f"{policy_dir}: the tokenizer pads with EOS (or not at all); prepare the model with the base stage")
    check_same_tokenizer(tokenizer, rm_dir)
    prompts = rlhf.read_prompts(cfg.data.prompts, "rlhf.data.prompts", cfg.max_prompt_length, tokenizer)
    if cfg.data.eval_prompts is not None:
        held = rlhf.read_prompts(cfg.data.eval_prompts, "rlhf.data.eval_prompts", cfg.max_prompt_length, tokenizer)
    else:
        prompts, held = data.split_rows(prompts, None, cfg.data.eval_fraction, seed, "rlhf.data.prompts")
    stats = rlhf.reward_stats(rm_dir) if cfg.normalize_scores else None
    if cfg.normalize_scores and stats is None:
        raise ConfigError(f"{rm_dir}: no reward_mean/reward_std in its manifest (not built by the rm stage); set rlhf.normalize_scores: false")
    ptx = _ptx_stream(cfg, tokenizer, accelerator.device, seed) if cfg.ptx_coef > 0 else None
    judge = evaluation.load_judge(cfg.judge, "rlhf.judge")

    set_seed(seed, device_specific=True)  # each process samples its own responses
    model, reference, reward_model = load_models(cfg, policy_dir, rm_dir, tokenizer, stats[1] if stats else 1.0)
    set_seed(seed, device_specific=True)  # the rollouts do not depend on how many adapter weights the layout drew
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, eps=1e-5)  # eps as in the N+ details (TF Adam)
    schedule = (lambda step: 1.0 - step / cfg.steps) if cfg.lr_scheduler == "linear" else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model = accelerator.unwrap_model(wrapped)
    _checkpoint_trainable_weights_only(accelerator)
    reward_model.to(accelerator.device)
    if reference is not None:
        reference.to(accelerator.device)
    layout = rollout.layout_for(model.policy, reward_model, *(m for m in (model.value_model, reference) if m is not None))
    if not layout.row_tokens:
        accelerator.print("[rlhf] these models attend across packed sequences; forward passes use one sequence per row (slower, same numbers)")
    kl_ctl = ppo.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target else ppo.FixedKLController(cfg.kl_coef)
    progress = Progress()
    accelerator.register_for_checkpointing(kl_ctl, progress)
    generation = GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )

    resume = ckpt.latest_checkpoint(out_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        accelerator.print(f"[rlhf] resuming from {resume} (step {progress.step})")
    metrics_path = out_dir / "metrics.jsonl"
    history = _read_history(metrics_path, progress.step)
    eval_before = ppo_output.before_training(accelerator, model, reward_model, tokenizer, held, cfg, stats, out_dir)
    if accelerator.is_main_process:
        accelerator.init_trackers("rlhf", config={"seed": seed})
    encoded = [data.encode_prompt(tokenizer, p) for p in prompts]
    per_rank, world = cfg.batch_size, accelerator.num_processes
    bar = training.progress_bar(cfg.steps, progress.step, "rlhf", accelerator.is_main_process)
    steps_this_attempt = 0
    fused = one_pass(cfg)
    # FSDP and DeepSpeed re-point module weights at their own storage inside every forward,
    # which would undo the folded weights mid-sampling: those sample unmerged.
    merge = cfg.merge_for_sampling and accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    while progress.step < cfg.steps:
        step = progress.step
        timer = Timer()
        # 1. rollout
        chosen = prompt_batch(len(encoded), step, per_rank * world, accelerator.process_index, per_rank, seed)
        queries, query_mask = rollout.left_pad([encoded[i] for i in chosen], tokenizer.pad_token_id, accelerator.device)
        with accelerator.autocast():  # generation calls the inner model, which prepare() did not wrap
            batch = rollout.make_rollout(model, reference, reward_model, queries, query_mask, generation, cfg.temperature, tokenizer.eos_token_id, tokenizer.pad_token_id, timer, layout, policy_pass=not fused, merge=merge)
        first_forward = None
        if fused:
            with timer("update"):
                first_forward = policy_forward(wrapped, batch, cfg, ptx, layout)
                batch.set_old(first_forward[0].detach(), first_forward[1].detach())
        if not torch.isfinite(batch.scores).all():
            raise ConfigError(f"rlhf: the reward model returned a non-finite score at step {step}; the last good checkpoint is kept")
        # 2. rewards: normalised score at the EOS, missing-EOS penalty, per-token KL penalty
        scores = ppo.normalize_scores(batch.scores, stats, cfg.score_clip)
        scores = ppo.penalize_missing_eos(scores, batch.ended, cfg.missing_eos_penalty)
        kl = ppo.per_token_kl(batch.logprobs, batch.ref_logprobs, batch.response_mask)
        rewards, non_score = ppo.shaped_rewards(scores, kl, kl_ctl.value, batch.response_mask)
        if cfg.whiten_rewards:
            rewards = ppo.masked_whiten(rewards, batch.response_mask, shift_mean=False)
        # 3. advantages
        advantages, returns = ppo.gae(rewards, batch.values, batch.response_mask, cfg.gamma, cfg.lam)
        advantages = ppo.masked_whiten(advantages, batch.response_mask)
        # 4. update
        with timer("update"):
            update_stats = ppo_update(accelerator, wrapped, optimizer, batch, advantages, returns, cfg, ptx, layout, first_forward)
        scheduler.step()
        # 5. bookkeeping
        kl_per_episode = accelerator.reduce(kl.sum(1).mean(), "mean").item()
        kl_coef = kl_ctl.value
        kl_ctl.update(kl_per_episode, per_rank * world)
        progress.step += 1
        progress.episodes += per_rank * world
        steps_this_attempt += 1
        row = _step_metrics(accelerator, progress, batch, scores, non_score, kl_per_episode, kl_coef, update_stats, scheduler, timer)
        if judge is not None:
            row["objective/gold_score"] = _gold_score(accelerator, judge, tokenizer, [prompts[i] for i in chosen], batch)
        history.append(row)
        if accelerator.is_main_process:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            accelerator.log(row, step=progress.step)
            if step % cfg.sample_steps == 0:
                ppo_output.write_rollout_samples(out_dir, tokenizer, batch, scores, progress.step)
        bar.update(1)
        bar.set_postfix(score=f"{row['objective/scores']:+.3f}", kl=f"{row['objective/kl']:.3f}")
        if progress.step % cfg.save_steps == 0 or progress.step == cfg.steps:
            _save_checkpoint(accelerator, out_dir, progress.step)
    bar.close()
    eval_after = ppo_output.evaluate_policy(accelerator, model, reward_model, tokenizer, held, cfg, stats, keep_text=cfg.num_samples)
    accelerator.print(f"[rlhf] held-out score {eval_before['score']:+.3f} -> {eval_after['score']:+.3f}")
    ppo_output.save_final(accelerator, model, tokenizer, out_dir, eval_before, eval_after)
    for tracker in accelerator.trackers:  # not end_training(): it would tear down the process group the runner still uses
        tracker.finish()
    last = history[-1] if history else {}
    return {
        "method": cfg.method,
        "steps": progress.step,
        "steps_last_attempt": steps_this_attempt,
        "episodes": progress.episodes,
        "train_prompts": len(prompts),
        "eval_prompts": len(held),
        "eval_before": {k: v for k, v in eval_before.items() if k != "samples"},
        "eval_after": {k: v for k, v in eval_after.items() if k != "samples"},
        "final_kl": last.get("objective/kl", 0.0),
        "final_kl_coef": kl_ctl.value,
        "mean_scores_first": history[0]["objective/scores"] if history else None,
        "mean_scores_last": last.get("objective/scores"),
        "seconds_per_step": sum(h["time/step"] for h in history) / len(history) if history else None,
        "reward_normalisation": {"mean": stats[0], "std": stats[1]} if stats else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _step_metrics(accelerator, progress, batch, scores, non_score, kl, kl_coef, update_stats, scheduler, timer) -> dict:
    """One step's metrics, averaged over processes, named as TRL and OpenRLHF users expect."""
    mask = batch.response_mask
    lengths = ppo.sequence_lengths(mask).float()
    local = {
        "objective/scores": scores.mean(),
        "objective/raw_scores": batch.scores.mean(),
        "objective/non_score_reward": non_score.sum(1).mean(),
        "objective/rlhf_reward": (scores + non_score.sum(1)).mean(),
        "response/length": lengths.mean(),
        "response/eos_fraction": batch.ended.float().mean(),
    }
    row = {"step": progress.step, "episode": progress.episodes}
    for key, value in local.items():
        row[key] = accelerator.reduce(value.detach().float(), "mean").item()
    row["objective/kl"] = kl
    row["objective/kl_coef"] = kl_coef
    for key, value in update_stats.items():
        row[key] = accelerator.reduce(torch.tensor(value, device=accelerator.device), "mean").item()
    row["objective/entropy"] = row.pop("policy/entropy") * row["response/length"]
    row["lr"] = scheduler.get_last_lr()[0]
    total = sum(timer.seconds.values())
    row.update({f"time/{k}": round(v, 3) for k, v in timer.seconds.items()})
    row["time/step"] = round(total, 3)
    tokens = accelerator.reduce(mask.sum().float() + batch.query_mask.sum().float(), "sum").item()
    row["tokens_per_second"] = round(tokens / total, 1) if total else None
    return row


def _gold_score(accelerator, judge, tokenizer, chat_prompts, batch) -> float | None:
    """Mean judge score of this step's responses over all processes (None if it rates none)."""
    lengths = ppo.sequence_lengths(batch.response_mask)
    golds = [judge(p[-1]["content"], tokenizer.decode(batch.responses[r, : lengths[r]], skip_special_tokens=True).strip()) for r, p in enumerate(chat_prompts)]
    golds = [g for g in golds if g is not None]
    total = accelerator.reduce(torch.tensor([sum(golds), len(golds)], dtype=torch.float32, device=accelerator.device), "sum")
    return (total[0] / total[1]).item() if total[1] > 0 else None


def _read_history(path: Path, step: int) -> list[dict]:
    """Metrics of the steps the checkpoint covers; lines a killed run wrote after it are dropped."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["step"] <= step]
    if len(kept) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _checkpoint_trainable_weights_only(accelerator) -> None:
    """Checkpoints hold the trainable tensors only. The frozen ones (with LoRA, the SFT
    weights under the adapters and the reward model under the value adapter, about
    0.5 GB each for SmolLM2) are rebuilt from the run's inputs on resume, so saving
    them every save_steps would only cost disk and time. FSDP and DeepSpeed save
    their own sharded way and keep everything."""
    from accelerate.utils import DistributedType
    from accelerate.utils.constants import MODEL_NAME

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        return

    def trainable(module):
        return {name for name, p in module.named_parameters() if p.requires_grad}

    def on_save(models, weights, output_dir):
        for i, (module, state) in enumerate(zip(models, weights, strict=True)):
            keep = trainable(module)
            weights[i] = {name: tensor for name, tensor in state.items() if name in keep}

    def on_load(models, input_dir):
        for i, module in enumerate(models):
            path = Path(input_dir) / f"{MODEL_NAME}{f'_{i}' if i else ''}.bin"
            state = torch.load(path, map_location="cpu", weights_only=True)
            keep = trainable(module)
            missing = keep - set(state)
            if missing:
                raise ConfigError(f"{path}: no {sorted(missing)[0]} ({len(missing)} trainable tensors missing); the checkpoint was written by another layout")
            module.load_state_dict({name: state[name] for name in keep}, strict=False)
        models.clear()  # loaded here; accelerate would insist on every frozen tensor too

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


def _save_checkpoint(accelerator, out_dir: Path, step: int) -> None:
    folder = out_dir / f"{ckpt.CHECKPOINT_PREFIX}{step}"
    accelerator.save_state(str(folder), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.mark_checkpoint_complete(folder)
        complete = sorted((p for p in out_dir.glob(f"{ckpt.CHECKPOINT_PREFIX}*") if (p / ckpt.CHECKPOINT_MARKER).exists()), key=ckpt.checkpoint_step)
        for old in complete[:-2]:  # the newest complete one survives a crash while writing the next
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _ptx_stream(cfg, tokenizer, device, seed):
    """Endless microbatches of SFT rows, loss on the response only, for PPO-ptx."""
    rows = [data.sft_example(where, row) for where, row in data.read_rows(cfg.data.ptx, "rlhf.data.ptx")]
    rng = random.Random(f"ptx:{seed}")
    examples = []
    for row in rows:
        prompt = data.encode_prompt(tokenizer, row["prompt"])
        response = tokenizer(row["completion"][0]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + response)[: cfg.max_prompt_length + cfg.max_new_tokens]
        examples.append((ids, [-100] * len(prompt) + response))
    if len(examples) < cfg.microbatch_size:
        raise ConfigError(f"rlhf.data.ptx: {len(examples)} row(s), fewer than one microbatch ({cfg.microbatch_size})")
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - cfg.microbatch_size + 1, cfg.microbatch_size):
            chunk = [examples[i] for i in order[start : start + cfg.microbatch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
            labels = torch.full((len(chunk), width), -100)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (seq, lab) in enumerate(chunk):
                ids[r, : len(seq)], labels[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), torch.tensor(lab[: len(seq)]), 1
            yield ids.to(device), mask.to(device), labels.to(device)
