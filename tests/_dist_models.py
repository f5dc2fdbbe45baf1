"""Importable build/step functions for tests/test_distributed.py (the spawned
ranks import them by module and name)."""

from __future__ import annotations

import torch
from torch import nn


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.head_a = nn.Linear(6, 1)
        self.head_b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.tanh(self.trunk(x))
        return self.head_a(z), self.head_b(z)


def build() -> nn.Module:
    torch.manual_seed(0)
    return TwoHeads()


def batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(n, 4, generator=g),
        "y": torch.randn(n, 1, generator=g),
        "c": torch.randint(0, 3, (n,), generator=g),
    }


def _losses(out: tuple[torch.Tensor, torch.Tensor], shard: dict) -> torch.Tensor:
    a, b = out
    mse = ((a - shard["y"]) ** 2).mean()
    ce = nn.functional.cross_entropy(b, shard["c"])
    return 0.7 * mse + 0.3 * ce


def step(model: nn.Module, shard: dict) -> None:
    """Correct: weighted losses, averaged over the shard, backward."""
    _losses(model(shard["x"]), shard).backward()


def step_divides(model: nn.Module, shard: dict) -> None:
    """Planted: divides the loss by the world size although DDP averages."""
    world = torch.distributed.get_world_size()  # 1 in gradcheck's one process
    (_losses(model(shard["x"]), shard) / world).backward()


def step_module(model: nn.Module, shard: dict) -> None:
    """Planted: the forward through model.module (DDP never synchronises)."""
    inner = getattr(model, "module", model)
    _losses(inner(shard["x"]), shard).backward()


def step_unused_head(model: nn.Module, shard: dict) -> None:
    """head_b's loss covers the samples of class 0 only, and is skipped where a
    shard has none: a rank whose shard holds no class 0 never uses head_b. The
    loss is a mean over the shard's samples (decomposable): correct under DDP
    with find_unused_parameters=True, a hang/error without it."""
    a, b = model(shard["x"])
    loss = ((a - shard["y"]) ** 2).mean()
    mask = shard["c"] == 0
    if bool(mask.any()):
        ce = nn.functional.cross_entropy(b, shard["c"], reduction="none")
        loss = loss + (ce * mask).sum() / len(mask)
    loss.backward()


def unused_batch(n: int = 8) -> dict[str, torch.Tensor]:
    """A batch whose first half (rank 0's shard of 2) holds class 0 and second
    half does not."""
    b = batch(n)
    b["c"][: n // 2] = torch.tensor([0, 1, 2, 0] * (n // 8) or [0] * (n // 2))
    b["c"][n // 2 :] = torch.tensor([1, 2] * (n // 4))
    return b


def build_unseeded() -> nn.Module:
    """Planted: no seed inside build (each process draws other weights)."""
    return TwoHeads()


def step_hangs(model: nn.Module, shard: dict) -> None:
    """Planted: rank 0 waits in a collective the other ranks never join."""
    step(model, shard)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() == 0:
        torch.distributed.barrier()


def step_raises(model: nn.Module, shard: dict) -> None:
    """Planted: raises on rank 1 only."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
        raise ValueError("rank 1 cannot read its shard")
    step(model, shard)


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.bn(self.lin(x))))


def build_batchnorm() -> nn.Module:
    torch.manual_seed(0)
    return Normed()


def step_batchnorm(model: nn.Module, shard: dict) -> None:
    ((model(shard["x"]) - shard["y"]) ** 2).mean().backward()


def build_dropout() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))


step_plain = step_batchnorm


_CACHED: list[nn.Module] = []


def build_cached() -> nn.Module:
    """Returns the same module object on every call (a user's cached model)."""
    if not _CACHED:
        _CACHED.append(build())
    return _CACHED[0]


def step_keyerror(model: nn.Module, shard: dict) -> None:
    """Raises in every process (the user's own bug, found in this process)."""
    raise KeyError("no such key")


def step_wrapper_api(model: nn.Module, shard: dict) -> None:
    """Correct, written for the wrapper: reads model.module (the inner model's
    attributes) and the world size, as DDP training code does."""
    assert isinstance(model.module, TwoHeads)
    world = torch.distributed.get_world_size()
    (_losses(model(shard["x"]), shard) * world / world).backward()


def build_per_process() -> nn.Module:
    """Planted: seeded by the process id - the same weights twice in one process,
    other weights in each rank."""
    import os

    torch.manual_seed(os.getpid())
    return TwoHeads()
