"""`python -m pipeline generate`: try a checkpoint by hand.

    python -m pipeline generate rlhf --prompt "What is 7 + 5?"     one answer
    python -m pipeline generate sft                                a chat loop (stdin)
    python -m pipeline generate runs/other/rlhf --greedy           any policy folder

The checkpoint is a stage name of the configured run (base, sft, rlhf) or a folder.
Sampling is greedy or temperature / top-k / top-p, through the same generation path
as PPO and evaluation.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError

POLICY_STAGES = ("base", "sft", "rlhf")


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", nargs="?", default="rlhf", help="stage of the run (base, sft, rlhf) or a model folder; default rlhf")
    parser.add_argument("--prompt", help="answer this prompt and exit; without it, chat on stdin")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (ignores the sampling settings)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=None, help="fix the sampling seed")


def resolve(checkpoint: str, run_dir: Path) -> Path:
    """The folder to load, or a ConfigError saying why it cannot be used."""
    if checkpoint in POLICY_STAGES:
        folder = ckpt.final_dir(run_dir, checkpoint)
        if not ckpt.is_complete(folder):
            raise ConfigError(f"{folder}: no complete {checkpoint} checkpoint in this run; build it with `make {checkpoint}`")
    else:
        folder = Path(checkpoint)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{checkpoint}: not a stage of this run ({', '.join(POLICY_STAGES)}) nor a model folder (no config.json)")
    manifest = ckpt.read_manifest(folder) or {}
    if manifest.get("stage") in ("rm", "eval"):
        raise ConfigError(f"{folder}: a {manifest['stage']} folder, not a policy; pick base, sft or rlhf")
    return folder


def main(args, run_dir: Path, stdin=None, stdout=None) -> int:
    import torch

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    from engine import sampling

    if args.temperature <= 0 and not args.greedy:
        raise ConfigError("--temperature: must be > 0 (or use --greedy)")
    folder = resolve(args.checkpoint, run_dir)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = sampling.load(folder, "cuda" if torch.cuda.is_available() else "cpu")
    how = sampling.Sampling(args.max_new_tokens, 0.0 if args.greedy else args.temperature, args.top_k, args.top_p)

    def answer(messages):
        response = sampling.generate(model, tokenizer, [messages], how)[0][0]
        return response.text + ("" if response.ended else " [cut at --max-new-tokens]")

    if args.prompt is not None:
        print(answer(sampling.user_prompt(args.prompt)), file=stdout)
        return 0
    print(f"Chatting with {folder}. An empty line or Ctrl-D ends; /reset starts over.", file=stdout)
    messages: list[dict] = []
    for line in stdin:
        text = line.strip()
        if not text:
            break
        if text == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": text})
        reply = answer(messages)
        messages.append({"role": "assistant", "content": reply})
        print(f"> {reply}", file=stdout, flush=True)
    return 0
