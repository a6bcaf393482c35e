"""What the runner tells the user about a run: the summary after `run`, the table of
`status`, and how long things took. Text only; the runner decides what is true."""

from __future__ import annotations

from pipeline import checkpoint as ckpt
from pipeline.errors import ConfigError

PAD = " " * 23  # continuation lines sit under the headline column


def duration(seconds) -> str:
    """`3m05s`, or `12.3s` under a minute; `?` when the time was not recorded."""
    if not isinstance(seconds, int | float):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def format_summary(rows: list[dict]) -> str:
    """One line per stage the run involved: built or reused, how long, its headline, its folder."""
    lines = ["[pipeline] summary:"]
    for row in rows:
        took = duration(row["seconds"]) if "seconds" in row else ""
        lines.append(f"  {row['stage']:<6} {row['action']:<8} {took:>8}  {row['headline']}  ({row['folder']})")
    return "\n".join(lines)


def status(runner) -> str:
    """Each stage's state (`runner.assess`), why it is stale, how far an interrupted run got,
    its headline metrics and folder. Stages the config leaves out are listed only when
    their folders exist."""
    rows = [f"run '{runner.config.run.name}' in {runner.run_dir} (config {runner.config.source})"]
    for stage in runner.stages:
        # (a stage the config leaves out is not assessed unless it has a folder: its
        # default data files need not exist)
        if stage.name not in runner.enabled and not ckpt.final_dir(runner.run_dir, stage.name).exists() and not ckpt.partial_dir(runner.run_dir, stage.name).exists():
            continue
        try:
            found = runner.assess(stage.name)
        except ConfigError as e:  # `run` would refuse it with this line; status shows it
            rows.extend([f"  {stage.name:<6} {'cannot tell':<14} -", f"{PAD}why: {e}"])
            continue
        if stage.name not in runner.enabled and found.manifest is None and found.partial is None:
            continue
        if found.manifest:
            rows.append(f"  {stage.name:<6} {found.state:<14} {saved_headline(stage, found.manifest)}")
            rows.append(f"{PAD}folder: {ckpt.final_dir(runner.run_dir, stage.name)}")
        elif found.partial is None:
            rows.append(f"  {stage.name:<6} {'missing':<14} -")
        rows.extend(f"{PAD}why: {reason}" for reason in found.reasons)
        if found.partial is not None:
            rows.extend(_interrupted(runner, stage.name, found))
    return "\n".join(rows)


def saved_headline(stage, manifest: dict) -> str:
    """The headline of a finished folder's metrics. A folder an older version of the
    project wrote may lack a metric the headline reads now: say so, not crash."""
    metrics = manifest.get("metrics") or {}
    try:
        return stage.headline(metrics)
    except (KeyError, TypeError, ValueError) as e:
        return f"(its manifest's metrics lack what this version shows: {e!r})"


def _interrupted(runner, name: str, found) -> list[str]:
    resumable = found.partial.get("fingerprint") == found.fingerprint
    at = f"at step {found.resume_step}" if found.resume_step else "before its first checkpoint"
    then = "the next run resumes it" if resumable else "made with another config: the next run starts over"
    first = f"{PAD}a rerun was interrupted {at}; {then}" if found.manifest else f"  {name:<6} {'interrupted':<14} {at}; {then}"
    return [first, f"{PAD}folder: {ckpt.partial_dir(runner.run_dir, name)}"]
