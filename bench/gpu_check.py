"""The prepared GPU check: one command, at most about 8 minutes on one GPU, one JSON.

    python -m bench.gpu_check --out gpu_check.json                     # the real default model
    python -m bench.gpu_check --out gpu_check.json --shape .gpu/smol   # random weights of that shape

Parts, each in its own process under its own time limit, so a part that fails or runs
out of time leaves the others' figures (the JSON is rewritten after every part):

1. env: torch, CUDA, the GPU and the package versions.
2. pipeline: configs/default.yaml end to end in a scratch run folder. `precision: auto`
   is bf16 autocast on a GPU, so this is the default run as a GPU user gets it. Each
   stage's wall time, headline figures and fallbacks come from its manifest.
3. ppo: bench.ppo_speed on that run's sft and rm, the default layout in fp32 and bf16,
   with seconds per step and peak GPU memory.
4. tests: the test suite without the slow marker; where a test leaves the device to
   the code (the stages, PPO), it runs on the GPU. Counts and the failing tests' names.

`--shape FOLDER` takes a model config and tokenizer and trains randomly initialised
weights of that shape instead of the configured base model. The device machine this
project is lent cannot receive SmolLM2's 94 MB file, so there the timings and memory
are real and the quality figures (accuracy, gold score) mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

STAGES = ("base", "sft", "rm", "rlhf", "eval")
SHARES = {"pipeline": 0.45, "ppo": 0.2}
"""Each part's share of --budget; the tests get what is left, at least a minute."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file written after every part")
    parser.add_argument("--shape", help="folder with config.json and a tokenizer: train random weights of that shape")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all parts together")
    parser.add_argument("--parts", default="env,pipeline,ppo,tests")
    parser.add_argument("--workers", type=int, default=8 if importlib.util.find_spec("xdist") else 0, help="pytest-xdist workers for the tests (0: one process; default 8 where xdist is installed)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    started = time.monotonic()
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": args.budget, "shape": args.shape}
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    run_dir = scratch / "runs" / "default"
    parts = args.parts.split(",")
    for part in parts:
        left = args.budget - (time.monotonic() - started)
        limit = max(60.0, left if part == "tests" else args.budget * SHARES.get(part, 0.1))
        print(f"[gpu_check] {part}: up to {limit:.0f}s", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            if part == "env":
                report["env"] = env()
            elif part == "pipeline":
                report["pipeline"] = pipeline(scratch, args.shape, limit)
            elif part == "ppo":
                report["ppo"] = ppo(run_dir, limit)
            elif part == "tests":
                report["tests"] = tests(scratch, args.workers, limit)
            else:
                report[part] = {"error": "unknown part"}
        except Exception as e:  # a broken part is a finding to record; the next part still runs
            report[part] = {"error": f"{type(e).__name__}: {e}"}
        report.setdefault(part, {})["seconds"] = round(time.monotonic() - t0, 1)
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def env() -> dict:
    import torch

    info: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["bf16"] = torch.cuda.is_bf16_supported()
    for name in ("transformers", "trl", "peft", "datasets", "accelerate", "tokenizers", "pyarrow", "fsspec"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:
            info[name] = f"unavailable: {type(e).__name__}: {e}"
    return info


def random_base(shape: Path, folder: Path) -> None:
    """Random weights (seed 0) with the config and tokenizer in `shape`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(shape).save_pretrained(folder)


def pipeline(scratch: Path, shape: str | None, limit: float) -> dict:
    sets = [f"run.output_dir={scratch / 'runs'}"]
    if shape:
        random_base(Path(shape), scratch / "random-base")
        sets.append(f"base.model={scratch / 'random-base'}")
    command = [sys.executable, "-m", "pipeline", "run", "--config", "configs/default.yaml"] + [arg for s in sets for arg in ("--set", s)]
    result = _run(command, limit)
    result.pop("stdout")
    run_dir = scratch / "runs" / "default"
    result["stages"] = {name: _stage(run_dir / name) for name in STAGES if (run_dir / name / "manifest.json").is_file()}
    return result


def _stage(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    metrics = manifest.get("metrics") or {}
    return {
        "status": manifest.get("status"),
        "seconds": (manifest.get("timings") or {}).get("seconds"),
        "precision": (manifest.get("config") or {}).get("precision"),
        "fallbacks": manifest.get("fallbacks"),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float | str)},
    }


def ppo(run_dir: Path, limit: float) -> dict:
    if not (run_dir / "rm" / "manifest.json").is_file():
        return {"error": f"{run_dir / 'rm'} was not built by the pipeline part"}
    command = [sys.executable, "-m", "bench.ppo_speed", "--run-dir", str(run_dir), "--steps", "4", "--variants", "lora-reward8,lora-reward8-bf16"]
    result = _run(command, limit)
    try:
        result["results"] = json.loads(result.pop("stdout"))["results"]
    except (KeyError, ValueError):
        pass
    return result


def tests(scratch: Path, workers: int, limit: float) -> dict:
    """-v names each failure on its own line as it happens, so the names survive a run
    that hangs or runs out of time before pytest's summary (seen on the H200, 2026-11-30)."""
    junit = scratch / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-v", "-m", "not slow", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    command += [f"-n{workers}"] if workers else []
    if importlib.util.find_spec("pytest_timeout"):
        command += ["--timeout", str(int(limit / 2))]
    result = _run(command, limit, env={"PYTHONUNBUFFERED": "1"})
    lines = result.pop("stdout").splitlines()
    result["passed"] = sum(" PASSED" in ln for ln in lines)
    result["failed"] = sorted({m.group(0) for ln in lines if re.search(r"\b(FAILED|ERROR)\b", ln) for m in [re.search(r"\S*::\S+", ln)] if m})
    result["log_tail"] = result["log_tail"][-3:]
    if junit.is_file():
        root = ET.parse(junit).getroot()
        result["messages"] = [f"{c.get('classname')}::{c.get('name')}: {_first_line(c)}" for c in root.iter("testcase") if _first_line(c)]
    return result


def _first_line(case) -> str:
    node = case.find("failure") if case.find("failure") is not None else case.find("error")
    return (node.get("message") or "").splitlines()[0][:300] if node is not None and node.get("message") else ""


def _run(command: list[str], limit: float, env: dict | None = None) -> dict:
    """Run with a time limit; the last lines of stderr say what happened."""
    t0 = time.monotonic()
    # Its own process group: on a timeout the workers it started (pytest-xdist, torchrun)
    # go with it, instead of holding the pipes open.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=limit)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        code = "timeout"
    tail = [ln for ln in (stderr + stdout).splitlines() if ln.strip()][-15:]
    return {"exit": code, "wall_s": round(time.monotonic() - t0, 1), "stdout": stdout, "log_tail": [re.sub(r"\s+", " ", ln)[:300] for ln in tail]}


if __name__ == "__main__":
    sys.exit(main())
