"""What makes a PPO run resumable: its position (step, episodes), which prompts each
step reads, the metrics history, and checkpoints that hold only the trainable tensors.

Checkpoints are `accelerator.save_state` folders (trainable weights, optimiser,
scheduler, every process's RNG, the KL controller, the position and the PPO-ptx
stream), marked COMPLETE once flushed, so a run killed at any moment continues from
the last one and, on CPU with a fixed seed, ends with the same weights as a run that
was never stopped.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from pipeline import checkpoint as ckpt
from pipeline.errors import ConfigError


class Progress:
    """The step counter and the position in the prompt stream, checkpointed with the rest."""

    def __init__(self):
        self.step = 0
        self.episodes = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "episodes": self.episodes}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.episodes = state["step"], state["episodes"]


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


def read_history(path: Path, step: int) -> list[dict]:
    """Metrics of the steps the checkpoint covers; lines a killed run wrote after it are dropped."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["step"] <= step]
    if len(kept) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def checkpoint_trainable_weights_only(accelerator) -> None:
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


def save_checkpoint(accelerator, out_dir: Path, step: int) -> None:
    folder = out_dir / f"{ckpt.CHECKPOINT_PREFIX}{step}"
    accelerator.save_state(str(folder), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.mark_checkpoint_complete(folder)
        complete = sorted((p for p in out_dir.glob(f"{ckpt.CHECKPOINT_PREFIX}*") if (p / ckpt.CHECKPOINT_MARKER).exists()), key=ckpt.checkpoint_step)
        for old in complete[:-2]:  # the newest complete one survives a crash while writing the next
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
