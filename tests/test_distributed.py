"""DDP and FSDP2 with fxfuse, in two CPU processes over gloo.

Each rank trains one step of a small RMSNorm block both ways (the wrapped eager model, and fxfuse's
rewrite or torch.compile of it) and compares the gradients every rank ends with. One spawn runs
every scenario: starting processes costs more than the scenarios.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available in this build")


class _Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        h = self.lin(x)
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _Model(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(d), _Block(d)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor shard (FSDP2) -> the whole


def _step_grads(model, x) -> list[torch.Tensor]:
    model(x).sum().backward()
    return [_full(p.grad) for p in model.parameters()]


def _scenarios(rank: int) -> None:
    import fxfuse
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(rank))  # each rank its own batch

    def fresh():
        torch.manual_seed(0)
        return _Model()

    def check(name, want, got):
        assert len(want) == len(got), name
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, msg=lambda m: f"{name}: {m}")

    def kinds(res):
        return [m.kind for m in res.matches]

    ddp_grads = _step_grads(DDP(fresh()), x)
    fsdp_grads = _step_grads(fully_shard(fresh()), x)

    res = fxfuse.rewrite(fresh(), (x,))
    assert kinds(res) == ["rms_norm", "rms_norm"]
    check("DDP(rewritten module)", ddp_grads, _step_grads(DDP(res.module), x))

    res = fxfuse.rewrite(DDP(fresh()), (x,))
    assert kinds(res) == ["rms_norm", "rms_norm"]
    check("rewrite(DDP model)", ddp_grads, _step_grads(res.module, x))

    check("torch.compile(DDP model)", ddp_grads, _step_grads(torch.compile(DDP(fresh()), backend="fxfuse"), x))

    # FSDP2: the rewritten module is what gets sharded, whole or block by block.
    res = fxfuse.rewrite(fresh(), (x,))
    check("fully_shard(rewritten module)", fsdp_grads, _step_grads(fully_shard(res.module), x))
    model = fresh()
    for i, block in enumerate(model.blocks):
        model.blocks[i] = fully_shard(fxfuse.rewrite(block, (x,)).module)
    check("fully_shard(each rewritten block)", fsdp_grads, _step_grads(fully_shard(model), x))

    # Sharded first: declined with the reason and what to do, not a tracer error.
    block_sharded = fresh()
    fully_shard(block_sharded.blocks[0])
    for sharded in (fully_shard(fresh()), block_sharded):
        try:
            fxfuse.rewrite(sharded, (x,))
        except fxfuse.CaptureError as err:
            assert "sharded with FSDP2" in str(err) and "fully_shard(res.module)" in str(err), str(err)
        else:
            raise AssertionError("rewrite of an FSDP2-sharded model was not declined")

    # A rewritten module whose blocks are sharded afterwards: the graph would read the shards.
    res = fxfuse.rewrite(fresh(), (x,))
    fully_shard(res.module.original.blocks[0])
    try:
        res.module(x)
    except fxfuse.CaptureError as err:
        assert "sharded with FSDP2" in str(err), str(err)
    else:
        raise AssertionError("a rewritten module whose block was sharded afterwards was not declined")

    check("torch.compile(FSDP2 model)", fsdp_grads, _step_grads(torch.compile(fully_shard(fresh()), backend="fxfuse"), x))


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        _scenarios(rank)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_with_rewrite_and_torch_compile_give_eager_gradients():
    # A failure in a rank is re-raised here with that rank's traceback.
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)
