"""`engine.sharding.whole` under a live DeepSpeed ZeRO-3 engine, in one process of its own
(its process group would outlive a test run in pytest's process), for
tests/engine/test_zero3_sampling.py. Not a test itself.

Usage: python -m tests.engine.zero3_sampling MODEL_DIR PORT. Exits 0 when every check holds;
an AssertionError says which did not."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from transformers import AutoModelForCausalLM

from engine.sharding import plain_copy, whole


@contextmanager
def counting_collectives():
    """The names of the torch.distributed collectives called in the block, in order."""
    called: list[str] = []
    originals = {name: getattr(dist, name) for name in ("all_gather_into_tensor", "all_gather", "broadcast", "all_reduce", "reduce_scatter_tensor")}

    def counted(name):
        def call(*args, **kwargs):
            called.append(name)
            return originals[name](*args, **kwargs)
        return call

    for name in originals:
        setattr(dist, name, counted(name))
    try:
        yield called
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def main(model_dir: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # an op training never uses (tests/stages/deepspeed_on_cpu.py)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    want = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=config)
    module = engine.module
    accelerator = SimpleNamespace(deepspeed_engine_wrapped=SimpleNamespace(engine=engine), is_main_process=True)
    ids = torch.tensor([[1, 2, 3, 4]])

    def status() -> set:
        return {p.ds_status for p in module.parameters()}

    assert status() == {ZeroParamStatus.NOT_AVAILABLE}, "ZeRO-3 partitioned the model"
    with whole(accelerator, module):
        with counting_collectives() as collectives:
            out = module.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        # With the engine's hooks on, every forward (one per new token) calls a collective,
        # which processes whose answers end at different lengths would wait on forever.
        assert collectives == [], f"sampling called {collectives}"
        assert status() == {ZeroParamStatus.AVAILABLE}, f"weights freed while sampling: {status()}"
    assert out.shape[1] == ids.shape[1] + 6
    assert status() == {ZeroParamStatus.NOT_AVAILABLE}, "partitioned again after the block"

    loss = engine(input_ids=ids, labels=ids).loss  # the engine's hooks are back: its own forward gathers
    engine.backward(loss)
    engine.step()
    got = plain_copy(accelerator, module, lambda: AutoModelForCausalLM.from_pretrained(model_dir)).state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].shape == want[k].shape for k in want), "the plain copy holds whole tensors"
    assert any(not torch.equal(got[k], want[k]) for k in want), "the step moved the weights the copy holds"
    print("zero3 sampling: ok")


if __name__ == "__main__":
    main(*sys.argv[1:])
