"""Sequence the stages: reuse what is up to date, resume what was interrupted, run the rest.

A stage's fingerprint covers its config (minus settings that cannot change the
result), the content of its local data files, the run seed and its parents'
fingerprints, so a change anywhere upstream makes everything downstream stale. A
finished folder also remembers which build of each parent it was made from, so a
parent rebuilt with `--force` makes its children stale too.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import checkpoint as ckpt
from pipeline import model_card, summary
from pipeline.config import Config, as_dict, fingerprint_view, local_paths, resolve_local
from pipeline.errors import ConfigError, TrainingDiverged
from pipeline.stage import Stage


@dataclasses.dataclass
class Assessment:
    """What the runner knows about one stage of the run before doing anything."""

    stage: Stage
    cfg: Any
    fingerprint: str
    material: dict
    inputs: dict[str, Path]
    """Parent stage -> the folder this stage reads (the run's, or an `init_from` folder)."""
    external: set[str]
    state: str
    """missing | complete | stale | interrupted"""
    reasons: list[str]
    manifest: dict | None
    """The finished folder's manifest, when there is one."""
    partial: dict | None
    """The manifest of an interrupted attempt, when there is one."""
    resume_step: int | None
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    """What the runner did that changes behaviour (a corrupt manifest rebuilt), for the log and the new manifest."""


class Runner:
    def __init__(self, config: Config, stages: tuple[Stage, ...], log: Callable[[str], None] | None = None):
        """`stages`: the registry (stages.STAGES), in pipeline order."""
        self.config = config
        self.stages = stages
        self.by_name = {stage.name: stage for stage in stages}
        self.enabled = {stage.name for stage in stages if not stage.optional or stage.name in config.named}
        """The stages of this run: every stage but an optional one its config does not name."""
        self.run_dir = config.run_dir
        self.hashes = ckpt.HashCache(self.run_dir / ".hashes.json")
        self._assessed: dict[str, Assessment] = {}
        self.world = _distributed_state()
        self.is_main = self.world is None or self.world.is_main_process
        self._log = log or (lambda line: print(line, flush=True))

    def log(self, line: str) -> None:
        if self.is_main:
            self._log(line)

    def barrier(self) -> None:
        if self.world is not None:
            self.world.wait_for_everyone()

    def close(self) -> None:
        """Tear down the process group while the interpreter is whole: left to exit, gloo's
        worker threads can outlive it and abort the process (pytorch/pytorch#190489)."""
        if self.world is not None:
            self.world.destroy_process_group()

    # ------------------------------------------------------------ assessing

    def parents(self, stage: Stage) -> list[str]:
        """The stage's parents in this run: an optional parent that is not part of it is left out."""
        return [parent for parent in stage.inputs if parent in self.enabled]

    def _input_setting(self, name: str, parent: str) -> str:
        stage = self.by_name[name]
        i = stage.inputs.index(parent)
        return stage.input_settings[i] if i < len(stage.input_settings) else "init_from"

    def assess(self, name: str) -> Assessment:
        if name in self._assessed:
            return self._assessed[name]
        stage, cfg = self.by_name[name], self.config.stages[name]
        inputs, external, input_prints = {}, set(), {}
        for i, parent in enumerate(stage.inputs):
            if parent not in self.enabled:
                continue
            key = stage.input_settings[i] if i < len(stage.input_settings) else None
            init_from = getattr(cfg, key, None) if key else None
            if init_from:
                folder = resolve_local(init_from, hub_allowed=False)
                inputs[parent], input_prints[parent] = folder, {"init_from": self.hashes(folder)}
                external.add(parent)
            else:
                inputs[parent] = ckpt.final_dir(self.run_dir, parent)
                input_prints[parent] = self.assess(parent).fingerprint
        material = {
            "stage": name,
            "seed": self.config.run.seed,
            "config": fingerprint_view(cfg, self.hashes, name),
            "inputs": input_prints,
        }
        fingerprint = ckpt.fingerprint_of(material)

        final, partial_path = ckpt.final_dir(self.run_dir, name), ckpt.partial_dir(self.run_dir, name)
        manifest = ckpt.read_manifest(final) if ckpt.is_complete(final) else None
        reasons: list[str] = []
        fallbacks: list[str] = []
        problem = ckpt.manifest_problem(final)
        if problem:
            fallbacks.append(f"rebuilt {name}: {problem}")
            reasons.append(problem)
        if manifest is None:
            state = "missing"
        else:
            if manifest.get("fingerprint") != fingerprint:
                reasons = self._explain(manifest.get("material", {}), material)
            for parent in self.parents(stage):
                if parent in external:
                    continue
                built_from = manifest.get("parents", {}).get(parent, {}).get("build_id")
                current = ckpt.read_manifest(ckpt.final_dir(self.run_dir, parent))
                if current and built_from and current.get("build_id") != built_from:
                    reasons.append(f"{parent} was rebuilt after {name} was made from it")
            state = "stale" if reasons else "complete"

        partial = ckpt.read_manifest(partial_path)
        resume_step = None
        if partial is not None and partial.get("status") == "running":
            latest = ckpt.latest_checkpoint(partial_path)
            resume_step = ckpt.checkpoint_step(latest) if latest else 0
            if state == "missing":
                state = "interrupted"
        else:
            partial = None
        found = Assessment(stage, cfg, fingerprint, material, inputs, external, state, reasons, manifest, partial, resume_step, fallbacks)
        self._assessed[name] = found
        return found

    def _explain(self, old: dict, new: dict) -> list[str]:
        """Say which settings, files or parents changed between two fingerprints."""
        reasons = []
        if old.get("seed") != new["seed"]:
            reasons.append(f"run.seed: {old.get('seed')!r} -> {new['seed']!r}")
        name = new["stage"]
        for key, before, after in _diff(old.get("config", {}), new["config"], name):
            if isinstance(after, str) and after.startswith(("sha256:", "checkpoint:")):
                reasons.append(f"{key}: file content changed")
            else:
                reasons.append(f"{key}: {before!r} -> {after!r}")
        for parent, after in new["inputs"].items():
            if old.get("inputs", {}).get(parent) == after:
                continue
            if isinstance(after, dict):
                key = self._input_setting(name, parent)
                reasons.append(f"{name}.{key}: that folder's content changed")
            else:
                why = self._assessed[parent].reasons if parent in self._assessed else []
                reasons.append(f"{parent} changed" + (f" ({'; '.join(why)})" if why else ""))
        return reasons or ["its fingerprint changed"]

    def plan(self, targets: tuple[str, ...], force: bool = False) -> list[str]:
        """Stages to run, upstream first. An up-to-date stage ends the walk: its
        parents are not needed, even if they are stale or were deleted. But when one of
        them is rebuilt all the same (another stage needs it), the up-to-date stage was
        made from its old build, so it is rebuilt too: a run never pairs a new parent
        with a child of the old one."""
        order: list[str] = []
        kept: list[str] = []

        def visit(name: str, forced: bool) -> None:
            found = self.assess(name)
            if found.state == "complete" and not forced:
                kept.append(name)
                return
            for parent in self.parents(found.stage):
                if parent not in found.external:
                    visit(parent, False)
            if name not in order:
                order.append(name)

        for target in targets:
            visit(target, force)
        while stale := [name for name in dict.fromkeys(kept) if name not in order and self._rebuilt_parents(name, order)]:
            for name in stale:
                found = self.assess(name)
                found.state = "stale"
                found.reasons.extend(f"{parent} is rebuilt in this run" for parent in self._rebuilt_parents(name, order))
                visit(name, True)
        return sorted(order, key=list(self.by_name).index)

    def _rebuilt_parents(self, name: str, order: list[str]) -> list[str]:
        found = self.assess(name)
        return [parent for parent in self.parents(found.stage) if parent not in found.external and parent in order]

    def involved(self, targets: tuple[str, ...], order: list[str]) -> list[str]:
        """The targets and the stages they read from, upstream first, leaving out any
        that this run neither runs nor finds on disk (not needed, not there)."""
        names: list[str] = []

        def visit(name: str) -> None:
            found = self.assess(name)
            for parent in self.parents(found.stage):
                if parent not in found.external:
                    visit(parent)
            if name not in names and (name in order or found.manifest is not None):
                names.append(name)

        for target in targets:
            visit(target)
        return names

    # ------------------------------------------------------------ running

    def run(self, *targets: str, force: bool = False) -> list[dict]:
        """Build `targets` (default: the last stage, so the whole pipeline) and what they
        need, in one process: several targets share one launch, and each stage runs once."""
        for target in targets:
            if target not in self.by_name:
                raise ConfigError(f"unknown stage {target!r} (stages: {', '.join(self.by_name)})")
        targets = tuple(sorted(set(targets), key=list(self.by_name).index)) or (self.stages[-1].name,)
        if not self.enabled.issuperset(targets):  # an optional stage asked for by name runs with its defaults
            self.enabled.update(targets)
            self._assessed.clear()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stage in self.stages:
                note = ckpt.recover(self.run_dir, stage.name)
                if note:
                    self.log(f"[pipeline] {note}")
        self.barrier()

        order = self.plan(targets, force)
        self.log(f"[pipeline] run '{self.config.run.name}' in {self.run_dir} (config {self.config.source})")
        involved = self.involved(targets, order)
        for name in involved:
            found = self.assess(name)
            if name not in order:
                self.log(f"[pipeline] {name}: up to date, reusing {ckpt.final_dir(self.run_dir, name)}")
            elif found.state == "stale":
                self.log(f"[pipeline] {name}: stale, will rerun: {'; '.join(found.reasons)}")
            elif found.state == "complete":
                self.log(f"[pipeline] {name}: up to date, rerunning it as asked (--force)")
            for message in found.fallbacks:
                self.log(f"[pipeline] {name}: fallback: {message}")
        # Every input is checked before the first stage starts, so a bad data line
        # fails in seconds instead of after an hour of upstream training.
        for name in order:
            self.assess(name).stage.check(self.assess(name).cfg)

        done = []
        for name in involved:
            if name in order:
                done.append(self._run_stage(self.assess(name)))
            else:
                found = self.assess(name)
                done.append({"stage": name, "action": "reused", "folder": str(ckpt.final_dir(self.run_dir, name)), "headline": summary.saved_headline(found.stage, found.manifest)})
            # built or reused (a crash may have come between promoting and publishing)
            if self.by_name[name].publish and self.is_main:
                self.by_name[name].publish(ckpt.final_dir(self.run_dir, name))
        if self.is_main:
            self.hashes.save()
        self.log(summary.format_summary(done))
        return done

    def _run_stage(self, found: Assessment) -> dict:
        name, stage = found.stage.name, found.stage
        partial = ckpt.partial_dir(self.run_dir, name)
        attempt, started = 1, ckpt.now()
        if self.is_main:
            previous = ckpt.read_manifest(partial)
            if previous is not None and previous.get("fingerprint") == found.fingerprint and previous.get("status") == "running":
                removed = ckpt.discard_unfinished_checkpoints(partial)
                attempt = previous["timings"]["attempts"] + 1
                started = previous["timings"]["started"]
                dropped = f" (dropped half-written {', '.join(removed)})" if removed else ""
                self.log(f"[pipeline] {name}: resuming the interrupted run from step {found.resume_step or 0}{dropped}")
            else:
                if partial.exists():
                    why = "whose manifest cannot be read" if previous is None else "made with another config"
                    self.log(f"[pipeline] {name}: discarding an interrupted run {why}")
                    ckpt.remove_tree(partial)
                partial.mkdir(parents=True)
            manifest = self._manifest(found, "running", {}, started, None, attempt)
            ckpt.write_json_atomic(partial / ckpt.MANIFEST, manifest)
        self.barrier()

        self.log(f"[pipeline] {name}: running -> {partial}")
        start = time.time()
        try:
            if stage.main_only and not self.is_main:
                metrics = {}
            else:
                metrics = stage.run(found.cfg, dict(found.inputs), partial, self.config.run.seed)
        except KeyboardInterrupt:
            step = ckpt.latest_checkpoint(partial)
            where = f"step {ckpt.checkpoint_step(step)}" if step else "its start (no checkpoint was saved yet)"
            self.log(f"\n[pipeline] {name}: interrupted; run the same command again to resume from {where}")
            raise
        except TrainingDiverged:
            step = ckpt.latest_checkpoint(partial)
            kept = f"its last good checkpoint (step {ckpt.checkpoint_step(step)}) is kept in {partial}" if step else f"no checkpoint was saved yet ({partial})"
            self.log(f"[pipeline] {name}: diverged; {kept}")
            raise
        except ConfigError:
            # The stage refused its input before training: leave no folder behind
            # unless an earlier attempt has progress worth resuming.
            if self.is_main and attempt == 1 and ckpt.latest_checkpoint(partial) is None:
                ckpt.remove_tree(partial)
            raise
        seconds = time.time() - start
        self.barrier()
        fallbacks = found.fallbacks + list(metrics.pop("fallbacks", None) or [])
        if self.is_main:
            manifest = self._manifest(found, "complete", metrics, started, seconds, attempt)
            manifest["fallbacks"] = fallbacks
            ckpt.write_json_atomic(partial / ckpt.MANIFEST, manifest)
            if stage.card:
                model_card.write(partial, manifest)
            ckpt.promote(self.run_dir, name)
            self._refresh_cards(found, metrics, manifest)
        self.barrier()
        folder = ckpt.final_dir(self.run_dir, name)
        headline = stage.headline(metrics)
        self.log(f"[pipeline] {name}: done in {summary.duration(seconds)}: {headline} -> {folder}")
        return {"stage": name, "action": "built", "seconds": seconds, "folder": str(folder), "headline": headline}

    def _refresh_cards(self, found: Assessment, metrics: dict, manifest: dict) -> None:
        """The run's model folders that this stage evaluated get its figures on their card
        (a folder named with init_from is the user's and is left alone)."""
        for parent, folder in found.inputs.items():
            if not self.by_name[parent].card or parent in found.external:
                continue
            figures, own = model_card.policy_figures(metrics, parent, manifest), ckpt.read_manifest(folder)
            if figures is not None and own is not None:
                model_card.write(folder, own, figures)

    def _manifest(self, found: Assessment, status: str, metrics: dict, started: str, seconds: float | None, attempt: int) -> dict:
        parents = {}
        for parent, folder in found.inputs.items():
            source = ckpt.read_manifest(folder) or {}
            parents[parent] = {"path": str(folder), "fingerprint": source.get("fingerprint"), "build_id": source.get("build_id")}
        return {
            "stage": found.stage.name,
            "status": status,
            "fingerprint": found.fingerprint,
            "build_id": ckpt.new_build_id(),
            "parents": parents,
            "data": {key: {"path": value, "hash": self.hashes(p) if (p := resolve_local(value)) else "hub"} for key, value in local_paths(found.cfg, found.stage.name)},
            "config": as_dict(found.cfg),
            "seed": self.config.run.seed,
            "metrics": metrics,
            # `seconds` is the last attempt's: an attempt that was killed cannot report its own.
            "timings": {"started": started, "finished": ckpt.now() if seconds is not None else None, "seconds": round(seconds, 1) if seconds is not None else None, "attempts": attempt},
            "versions": ckpt.library_versions(),
            "world_size": self.world.num_processes if self.world is not None else 1,
            "distributed": _distributed(self.world),
            "material": found.material,
        }

    # ------------------------------------------------------------ status

    def status(self) -> str:
        """Each stage's state, why it is stale, how far an interrupted run got, its headline metrics and folder."""
        return summary.status(self)


def _diff(old: Any, new: Any, prefix: str):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _diff(old.get(key), new.get(key), f"{prefix}.{key}")
    elif old != new:
        yield prefix, old, new


def _distributed(world) -> str | None:
    """How accelerate ran the stage's processes (MULTI_CPU or MULTI_GPU for DDP, FSDP,
    DEEPSPEED with its ZeRO stage), which can differ from what the launch asked for."""
    if world is None:
        return None
    kind = world.distributed_type.value
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return f"{kind} (ZeRO-{stage})" if kind == "DEEPSPEED" and stage else kind


def _distributed_state():
    """accelerate's process state when launched on several processes (torchrun,
    accelerate launch), else None: one process needs no process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    # Without cpu=True, accelerate leaves CPU-only processes unaware of each other.
    return PartialState(cpu=not torch.accelerator.is_available())
