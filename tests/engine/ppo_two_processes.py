"""`python -m pipeline` for the two-process PPO tests, run under torchrun: it records
what each process did, its prompt indices at every step and a checksum of its
trainable weights after every update (and each episode's prompt and first-token
advantage), in $PPO_RECORD.<rank>.jsonl. Not a test itself."""

from __future__ import annotations

import json
import os
import sys

from engine import driver
from pipeline import cli


def main() -> int:
    record = open(f"{os.environ['PPO_RECORD']}.{os.environ['RANK']}.jsonl", "a", encoding="utf-8")
    prompt_batch, ppo_update = driver.prompt_batch, driver.ppo_update

    def chosen(n_prompts, step, *rest):
        indices = prompt_batch(n_prompts, step, *rest)
        record.write(json.dumps({"step": step, "prompts": indices}) + "\n")
        record.flush()
        return indices

    def update(learner, batch, advantages, *args, **kwargs):
        stats = ppo_update(learner, batch, advantages, *args, **kwargs)
        params = [p.detach().double() for p in learner.model.parameters() if p.requires_grad]
        sums = [float(sum(p.sum() for p in params)), float(sum((p * p).sum() for p in params))]
        # Which prompt each episode answered, and its advantage on its first token: enough
        # to see that groups stay whole on one process and are baselined as a whole.
        queries = [hash(tuple(row[mask.bool()].tolist())) for row, mask in zip(batch.queries, batch.query_mask, strict=True)]
        record.write(json.dumps({"weights": sums, "queries": queries, "advantages": advantages[:, 0].tolist()}) + "\n")
        record.flush()
        return stats

    driver.prompt_batch, driver.ppo_update = chosen, update
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    cli.exit_process(main())
