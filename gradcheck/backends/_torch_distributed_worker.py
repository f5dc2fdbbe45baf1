"""One rank of check_distributed: ``python -m
gradcheck.backends._torch_distributed_worker DIR RANK WORLD_SIZE BACKEND PORT
TIMEOUT``.

Joins the process group on 127.0.0.1:PORT (every collective bounded by
TIMEOUT seconds), writes ``DIR/ready-RANK.pkl``, then for every task number N
read on stdin runs ``DIR/task-N.pkl`` (:func:`torch_distributed.execute`) and
writes ``DIR/result-N-RANK.pkl`` (written to a temporary name, then renamed: the
parent never reads half a file). Leaves when stdin closes, or after a failed
task (its peers, possibly waiting in a collective, then fail at once)."""

from __future__ import annotations

import os
import pickle
import sys
import traceback
import types
import warnings
from typing import Any


def _write(directory: str, name: str, data: dict[str, Any]) -> None:
    path = os.path.join(directory, name)
    with open(path + ".tmp", "wb") as f:
        pickle.dump(data, f)
    os.replace(path + ".tmp", path)


def _load_main(path: str) -> None:
    """The parent's script as ``__mp_main__`` (its ``if __name__ == '__main__'``
    block does not run), also reachable as ``__main__`` for unpickling."""
    import runpy

    module = types.ModuleType("__mp_main__")
    module.__dict__.update(runpy.run_path(path, run_name="__mp_main__"))
    module.__file__ = path
    sys.modules["__mp_main__"] = module
    sys.modules["__main__"] = module


def main(argv: list[str]) -> int:
    directory, rank, world, backend, port, timeout = argv
    rank_i, world_i = int(rank), int(world)
    try:
        with open(os.path.join(directory, "init.pkl"), "rb") as f:
            init = pickle.load(f)
        for p in reversed(init["sys_path"]):
            if p not in sys.path:
                sys.path.insert(0, p)
        if init.get("main"):
            _load_main(init["main"])
        import datetime

        import torch
        import torch.distributed as dist

        from gradcheck.backends import torch_distributed as td

        torch.set_num_threads(1)
        # DDP's performance note on a conv weight whose gradient strides differ
        # from its bucket view (channels_last-like layouts): about speed, not the
        # gradient, and this rank process is gradcheck's (the audit printed it)
        warnings.filterwarnings(
            "ignore", message="Grad strides do not match bucket view strides"
        )
        device = "cpu"
        if backend == "nccl":
            device = f"cuda:{rank_i % max(1, torch.cuda.device_count())}"
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank_i,
            world_size=world_i,
            timeout=datetime.timedelta(seconds=float(timeout)),
        )
    except BaseException as exc:
        _write(
            directory,
            f"ready-{rank}.pkl",
            {
                "ok": False,
                "phase": "start",
                "kind": "exception",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            },
        )
        return 1
    _write(directory, f"ready-{rank}.pkl", {"ok": True, "pid": os.getpid()})
    code = 0
    for line in sys.stdin:
        number = line.strip()
        if not number:
            break
        try:
            with open(os.path.join(directory, f"task-{number}.pkl"), "rb") as f:
                task = pickle.load(f)
        except BaseException as exc:
            result = {
                "ok": False,
                "phase": "load",
                "kind": "exception",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        else:
            result = td.execute(task, rank_i, world_i, device)
        _write(directory, f"result-{number}-{rank}.pkl", result)
        if not result.get("ok"):
            code = 1
            break
    try:
        dist.destroy_process_group()
    except BaseException:
        pass
    return code


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    raise SystemExit(main(sys.argv[1:]))
