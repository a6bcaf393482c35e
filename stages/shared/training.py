"""Pieces the Trainer stages (SFT, RM, DPO) share: their TRL arguments, resumable
checkpoints, the cached "before training" numbers, the merged-LoRA save and the
training log. Imported only inside stage `run` functions (it pulls in torch).

Under FSDP (accelerate launch --config_file configs/accelerate/fsdp2.yaml) each process
holds a shard of the weights once training starts, so `train` gathers them into one whole
copy on the main process, which `save_model` writes as a plain folder."""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback

from engine import device, sampling, sharding
from engine.device import cpu_only, mixed_precision
from pipeline import checkpoint as ckpt
from pipeline.errors import ConfigError, TrainingDiverged


def trainer_arguments(cfg, out_dir: Path, seed: int) -> dict:
    """The TrainingArguments every Trainer stage passes, from its TrainerSettings."""
    precision = mixed_precision(cfg.precision)
    return {
        "output_dir": str(out_dir),
        "seed": seed,
        "data_seed": seed,
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler,
        "warmup_steps": cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "activation_checkpointing": cfg.activation_checkpointing,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": 2,  # the newest complete checkpoint survives a crash while writing the next
        "logging_steps": cfg.logging_steps,
        "report_to": list(cfg.report_to),
        "dataloader_num_workers": 0,
        "use_cpu": cpu_only(),
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
    }


def load_tokenizer(model_dir: Path):
    """The tokenizer of a stage's input folder, refused if it pads with EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ConfigError(f"{model_dir}: the tokenizer pads with EOS (or not at all); prepare the model with the base stage, which fixes this")
    return tokenizer


class MarkCompleteCheckpoints(TrainerCallback):
    """After the Trainer writes checkpoint-N, flush it and add a COMPLETE marker:
    resuming only ever starts from a checkpoint that was written whole."""

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has written its RNG state
        if state.is_world_process_zero:
            ckpt.mark_checkpoint_complete(Path(args.output_dir) / f"{ckpt.CHECKPOINT_PREFIX}{state.global_step}")
        return control


class StopOnDivergence(TrainerCallback):
    """Before every step the Trainer logs, evaluates or saves after, and after the last,
    check that the trained weights are finite, and stop the stage (exit 3) if not. A NaN
    loss turns every weight NaN within a step (through the clipped gradient or Adam), and
    the Trainer's log hides it (a NaN step's loss is replaced by the running mean), so the
    weights are what is checked; as no save comes before the check, the last checkpoint in
    the work folder is a good one. Every process checks its own shard and all agree."""

    def __init__(self, accelerator, name: str):
        self.accelerator, self.name = accelerator, name

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not (control.should_log or control.should_evaluate or control.should_save or state.global_step >= state.max_steps):
            return control
        # one flag per tensor, gathered on the device: a single sync, not one per tensor
        device = self.accelerator.device
        flags = [torch.isfinite(t).all().to(device) for p in model.parameters() if p.requires_grad and (t := _local_part(p)).numel()]
        bad = (~torch.stack(flags).all()).float() if flags else torch.zeros((), device=device)
        if self.accelerator.reduce(bad, "sum").item() > 0:
            raise TrainingDiverged(
                f"{self.name}: the weights are no longer finite (NaN or inf) at step {state.global_step}; "
                f"lower {self.name}.learning_rate or check the data"
            )
        return control


def _local_part(param: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: its ZeRO-3 partition, its FSDP2 shard, or itself."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    return param.to_local() if hasattr(param, "to_local") else param


class CountSteps(TrainerCallback):
    """Optimiser steps taken by this process: after a resume, only the remaining ones."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        return control


class HeldOutCurve(TrainerCallback):
    """Every `every` optimiser steps, a held-out measurement (`measure(model)`, run on every
    process) goes into the log history under `key`, with the step: the learning curve. The
    history is checkpointed, so a resumed run keeps the points before the kill."""

    def __init__(self, measure: Callable, every: int, key: str):
        self.measure, self.every, self.key = measure, every, key

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            start = time.perf_counter()
            value = self.measure(model)
            state.log_history.append({"step": state.global_step, self.key: value, "measure_seconds": round(time.perf_counter() - start, 1)})
        return control


def precision_used(trainer) -> str:
    """What the Trainer ran in ("auto" resolved): the manifest says bf16 where a GPU made it so."""
    return "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32"


def dropped_sharding(trainer, name: str) -> list[str]:
    """The Trainer's `engine.device.dropped_sharding` fallbacks, logged once by the main
    process and returned for the manifest's `fallbacks`."""
    notes = device.dropped_sharding(trainer.accelerator)
    if trainer.is_world_process_zero():
        for note in notes:
            print(f"[{name}] fallback: {note}", flush=True)
    return notes


def curve(history: list[dict], key: str) -> list[dict]:
    """The points a HeldOutCurve logged: [{"step", key, "measure_seconds"}] (the time the
    measurement took inside the training loop), in step order."""
    return [{"step": row["step"], key: row[key], "measure_seconds": row["measure_seconds"]} for row in history if key in row]


def train(trainer, name: str, out_dir: Path) -> int:
    """Train, resuming from the newest complete checkpoint in `out_dir`; returns the
    optimiser steps this attempt took."""
    latest = ckpt.latest_checkpoint(out_dir)
    if latest:
        print(f"[{name}] resuming from {latest}", flush=True)
    counter = CountSteps()
    trainer.add_callback(counter)
    trainer.add_callback(StopOnDivergence(trainer.accelerator, name))
    trainer.train(resume_from_checkpoint=str(latest) if latest else None)
    _gather_if_sharded(trainer)
    return counter.steps


def evaluate_before_training(trainer) -> dict:
    """trainer.evaluate() before trainer.train(), leaving the model to be wrapped for training.

    transformers 5.24 prepares the model for evaluation only, and accelerate 1.15 then marks
    it prepared (`_is_accelerate_prepared`), so training would skip wrapping it in DDP: each
    process would train alone on its share of the data. The mark is taken off again. Under
    FSDP2 transformers asks accelerate to shard the model without its optimizer there, which
    accelerate refuses ("a model and optimizer must be passed together"); registered as it
    is, whole on every process's device (as under DDP, so it must fit on one; and not with
    fsdp_cpu_ram_efficient_loading, which leaves all but the main process empty until
    training), the model is evaluated as under DDP and sharded when training starts."""
    if getattr(trainer, "is_fsdp_enabled", False) and not sharding.units(trainer.model):
        trainer.model.to(trainer.args.device)
        trainer.accelerator.prepare_model(trainer.model, evaluation_mode=True)
    # ZeRO-1 and -2 keep every parameter whole on every process, and `before_training`
    # gathers ZeRO-3's (engine/sharding.py), so the model is evaluated as under DDP.
    # transformers would start a DeepSpeed inference engine instead, which it refuses below
    # ZeRO-3 ("ZeRO inference only makes sense with ZeRO Stage 3") and which leaves ZeRO-3's
    # training without an engine (huggingface/transformers#44889).
    whole_under_zero = trainer.is_deepspeed_enabled
    if whole_under_zero:
        trainer.is_deepspeed_enabled = False
    try:
        return trainer.evaluate()
    finally:
        if whole_under_zero:
            trainer.is_deepspeed_enabled = True
        trainer.model.__dict__.pop("_is_accelerate_prepared", None)
        # In mixed precision, preparing for evaluation wrapped forward in autocast; FSDP2's
        # training preparation adds none (its MixedPrecisionPolicy casts instead), so a kept
        # wrapper gave a fresh run autocast and a resumed run (which skips this) not: they
        # parted by 1e-4 in bf16. Training starts from the forward it would have had.
        original = trainer.model.__dict__.pop("_original_forward", None)
        if original is not None:
            trainer.model.forward = original


_WHOLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""A sharded model -> its whole copy on the main process, for save_model."""


def _gather_if_sharded(trainer) -> None:
    """Every process takes part in gathering the full state dict, which only the main
    process receives; it loads it into a whole copy of the model there."""
    if not sharding.sharded(trainer.model):
        return
    zero3 = bool(sharding.partitioned(trainer.model))
    # DeepSpeed gathers through its engine (zero3_save_16bit_model: the weights in their
    # training dtype, fp32 unless bf16 is on); FSDP through the sharded module itself.
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped if zero3 else trainer.model)
    if trainer.is_world_process_zero():
        _WHOLE[trainer.model] = whole_copy(trainer.model, state)


def whole_copy(model, state: dict):
    """An unsharded model of `model`'s kind (a PEFT model with the same adapter when it is
    one) holding `state`, built on the meta device and then filled: parameters and
    persistent buffers from `state`, in their dtypes; the other buffers (rotary
    frequencies) from `model`, where FSDP leaves them whole."""
    from peft import PeftModel, get_peft_model
    from torch.distributed.fsdp import FSDPModule

    peft = isinstance(model, PeftModel)
    inner = model.get_base_model() if peft else model
    cls = next(c for c in type(inner).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"), sharding.built_whole():
        copy = cls(inner.config)
    copy.to_empty(device="cpu")
    copy.tie_weights()  # to_empty gives each module its own tensor
    if peft:
        copy = get_peft_model(copy, model.peft_config[model.active_adapter], adapter_name=model.active_adapter)
    with torch.no_grad():
        for name, param in copy.named_parameters():  # tied weights appear once here, and stay tied
            param.data = param.data.to(state[name].dtype)
        copy.load_state_dict(state, strict=True)
        live = dict(model.named_buffers())
        for name, buffer in copy.named_buffers():
            if name not in state:
                buffer.copy_(live[name])
    return copy


def before_training(trainer, out_dir: Path, measure: Callable[[], dict]) -> dict:
    """The starting model's numbers, measured once (on whole weights) and kept in the work
    folder, so a resumed run reports the true starting point rather than a checkpoint's."""
    path = out_dir / "before_training.json"
    if path.exists():
        return json.loads(path.read_text())
    with sharding.whole(trainer.accelerator, trainer.model):  # ZeRO-3 partitions weights as they load
        result = measure()
    if trainer.is_world_process_zero():
        ckpt.write_json_atomic(path, result)  # a resume reads it back: never leave it torn
    return result


def save_model(model, tokenizer, out_dir: Path, lora: bool):
    """The trained model as a plain folder; with LoRA, merged, the adapter kept in
    adapter/ beside it. Returns the model as saved (under FSDP, the whole copy `train`
    gathered on the main process)."""
    model = _WHOLE.pop(model, model)
    if lora:
        model.save_pretrained(out_dir / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def write_samples(out_dir: Path, rows: list[dict]) -> None:
    """samples.jsonl for programs and samples.md for people, side by side."""
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    lines = ["# Sample generations (greedy, held-out prompts)", ""]
    for i, row in enumerate(rows, start=1):
        lines.append(f"## {i}. {row['prompt']}")
        for key, value in row.items():
            if key != "prompt":
                lines += [f"**{key}:**", "", "> " + (value or "(empty)").replace("\n", "\n> "), ""]
    (out_dir / "samples.md").write_text("\n".join(lines), encoding="utf-8")


def write_log_history(out_dir: Path, history: list[dict]) -> None:
    with open(out_dir / "trainer_log.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in history)


def greedy_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy responses to chat prompts through the one sampling path."""
    was_training = model.training
    model.eval()
    try:
        rows = sampling.generate(model, tokenizer, prompts, sampling.Sampling(max_new_tokens, temperature=0.0), batch_size=8)
    finally:
        model.train(was_training)
    return [responses[0].text for responses in rows]
