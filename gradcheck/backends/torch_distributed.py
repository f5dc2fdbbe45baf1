"""check_distributed's PyTorch side: the user's ``build``/``step`` in this process
(the single-process reference) and in ``world_size`` processes under
``torch.distributed`` (DDP or FSDP2), with every collective and every wait
bounded by a timeout.

What crosses a process boundary is pickled data of NumPy arrays in files of a
private temporary folder: a multiprocessing queue of tensors shares their
storage through file descriptors, which failed between spawned processes, and
files outlive a rank that dies. Only builtins and NumPy travel - a tensor
becomes a plain dict (:func:`portable`: the array, its dtype's name,
requires_grad, under the key ``TENSOR``), results are dicts of arrays - never
an instance of a gradcheck class: pickle finds a class by its module's current
object, and a gradcheck module imported a second time (pytester dropping it
from ``sys.modules``, IPython's autoreload, importlib.reload) made its classes
other objects than the ones the data was built with ("PicklingError: ... not
the same object as gradcheck.backends.torch_distributed._Leaf", as CI saw).

The workers are ``python -m gradcheck.backends._torch_distributed_worker``
subprocesses (not ``multiprocessing``: they can be started from a daemonic
process, such as an audit helper, and killed one by one). A worker reads task numbers on its stdin
and exits when it closes, so a parent that dies takes its workers with it.

See :mod:`gradcheck.properties.distributed` for what is compared and why.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import itertools
import os
import pickle
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradcheck.errors import (
    NoGradientError,
    UnsupportedInputError,
)

__all__ = [
    "Pool",
    "UserState",
    "batch_size",
    "digest",
    "execute",
    "gradients",
    "in_torchrun",
    "keep_workers",
    "launched_world_size",
    "portable",
    "run_in_torchrun",
    "run_spawned",
    "shard",
    "single_process_group",
    "unportable",
]

FRAMEWORK = "torch"

#: the environment torchrun (and every torch.distributed launcher) sets
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

#: DDP's message when a rank's backward left a bucket unreduced (a parameter
#: unused on that rank, find_unused_parameters=False)
UNFINISHED_REDUCTION = "Expected to have finished reduction"


# ====================================================================== batches
#: The key that marks a dict as one tensor in transit (:func:`portable`); its
#: value is the format's version.
TENSOR = "__gradcheck_tensor__"


def _is_leaf(obj: Any) -> bool:
    """A tensor in transit: ``{TENSOR: 1, "array", "dtype", "requires_grad"}``."""
    return isinstance(obj, dict) and obj.get(TENSOR) == 1


def _map(obj: Any, fn: Callable[[Any], Any], match: Callable[[Any], bool]) -> Any:
    """``obj`` with ``fn`` applied to every leaf ``match`` accepts, inside dicts,
    lists, tuples and namedtuples (checked before a dict is entered: a tensor in
    transit is a dict)."""
    if match(obj):
        return fn(obj)
    if isinstance(obj, dict):
        items = [(k, _map(v, fn, match)) for k, v in obj.items()]
        try:
            return type(obj)(items)
        except TypeError:
            return dict(items)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map(v, fn, match) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn, match) for v in obj)
    return obj


def _tensor(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor)


def _any_leaf(obj: Any) -> bool:
    return isinstance(obj, (torch.Tensor, np.ndarray)) or _is_leaf(obj)


def _leaves(obj: Any, match: Callable[[Any], bool]) -> list[Any]:
    out: list[Any] = []
    _map(obj, lambda x: out.append(x) or x, match)
    return out


def portable(batch: Any) -> Any:
    """``batch`` with every tensor as a plain dict ``{TENSOR: 1, "array":
    ndarray, "dtype": "float32", "requires_grad": bool}`` (builtins and NumPy
    only: see the module docstring; bfloat16 and other dtypes NumPy lacks
    travel as float32 and are cast back)."""

    def leaf(t: torch.Tensor) -> dict[str, Any]:
        data = t.detach().to("cpu")
        if data.dtype in (torch.bfloat16,) or str(data.dtype).startswith(
            "torch.float8"
        ):
            data = data.float()
        return {
            TENSOR: 1,
            "array": np.array(data.numpy(), copy=True),
            "dtype": str(t.dtype).replace("torch.", ""),
            "requires_grad": bool(t.requires_grad),
        }

    return _map(batch, leaf, _tensor)


def unportable(batch: Any, device: str = "cpu") -> Any:
    """The inverse of :func:`portable`: fresh tensors on ``device``."""

    def tensor(leaf: dict[str, Any]) -> torch.Tensor:
        dtype = getattr(torch, leaf["dtype"])
        t = torch.from_numpy(np.array(leaf["array"], copy=True)).to(device, dtype)
        return t.requires_grad_(leaf["requires_grad"]) if t.is_floating_point() else t

    return _map(batch, tensor, _is_leaf)


def batch_size(batch: Any) -> int:
    """The common size of dim 0 of every tensor in ``batch``."""
    found = _leaves(batch, _any_leaf)
    if not found:
        raise UnsupportedInputError(
            "batch holds no tensor: pass a tensor, or a tuple/list/dict of tensors "
            "whose dim 0 is the batch dimension (gradcheck gives each rank its "
            "equal slice of it)."
        )
    sizes = set()
    for t in found:
        shape = t["array"].shape if _is_leaf(t) else tuple(t.shape)
        if len(shape) == 0:
            raise UnsupportedInputError(
                "batch holds a 0-dim tensor: every tensor in batch must have the "
                "batch dimension first (a scalar cannot be split between ranks; "
                "pass it inside step instead)."
            )
        sizes.add(shape[0])
    if len(sizes) > 1:
        raise UnsupportedInputError(
            f"the tensors in batch have different sizes along dim 0 ({sorted(sizes)})"
            ": every tensor must have the batch dimension first, the same size."
        )
    return sizes.pop()


def shard(batch: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s equal slice of dim 0 (tensors, leaves and arrays)."""
    n = batch_size(batch) // world_size
    lo, hi = rank * n, (rank + 1) * n

    def cut(t: Any) -> Any:
        if _is_leaf(t):
            return dict(t, array=t["array"][lo:hi])
        if isinstance(t, torch.Tensor):
            return t.detach()[lo:hi].clone().requires_grad_(t.requires_grad)
        return t[lo:hi]

    return _map(batch, cut, _any_leaf)


def _cast(batch: Any, dtype: torch.dtype | None) -> Any:
    """A copy of ``batch`` with floating tensors in ``dtype`` (None: as they are)."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        if dtype is not None and out.is_floating_point():
            out = out.to(dtype)
        return out.requires_grad_(t.requires_grad) if out.is_floating_point() else out

    return _map(batch, cast, _tensor)


# ====================================================================== models
def built_model(build: Callable[[], Any]) -> torch.nn.Module:
    """``build()``, checked to be an ``nn.Module`` with trainable parameters."""
    model = build()
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedInputError(
            f"build() returned {type(model).__name__}; check_distributed needs it to "
            "return the torch.nn.Module that step trains."
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise UnsupportedInputError(
            "the model build() returns has no parameter that requires grad: there "
            "is no gradient to synchronise."
        )
    return model


def names_of(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def precision(model: torch.nn.Module) -> str:
    """The model's floating dtype (its widest trainable parameter's)."""
    order = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    found = [p.dtype for p in model.parameters() if p.requires_grad]
    known = [d for d in found if d in order]
    best = max(known, key=order.index) if known else torch.float32
    return str(best).replace("torch.", "")


def digest(model: torch.nn.Module) -> dict[str, str]:
    """A hash of every parameter's and buffer's bytes, by name."""
    out: dict[str, str] = {}
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        data = t.detach().to("cpu")
        if data.dtype == torch.bfloat16:
            data = data.float()
        h = hashlib.sha256(str((tuple(data.shape), str(t.dtype))).encode())
        h.update(np.ascontiguousarray(data.numpy()).tobytes())
        out[name] = h.hexdigest()
    return out


def differing(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """Names whose hash differs (or that exist on one side only)."""
    return sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))


def _fresh(template: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    model = copy.deepcopy(template)
    if dtype is not None:
        model = model.to(dtype)
    for p in model.parameters():
        p.grad = None
    return model


def gradients(
    template: torch.nn.Module,
    step: Callable[[Any, Any], Any],
    batch: Any,
    *,
    dtype: str | None = None,
    seed: int = 0,
    wrap: str | None = None,
    wrap_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray | None]:
    """``step(copy, batch_copy)`` in this process, on a deep copy of
    ``template`` (in ``dtype``, with the batch's floating tensors cast too); the
    ``.grad`` it leaves on each trainable parameter as float64 NumPy (None: no
    gradient). Raises NoGradientError when it leaves none at all.

    ``wrap``: inside a process group of world size 1 (:func:`single_process_group`)
    the copy is wrapped as the ranks wrap theirs, so a step written for the
    wrapper (``model.module``, ``model.no_sync()``) runs as in one process."""
    import torch.distributed as dist

    tdtype = getattr(torch, dtype) if dtype else None
    model = _fresh(template, tdtype)
    given: Any = model
    if wrap and dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == 1:
            # find_unused_parameters changes nothing in a world of one but makes
            # DDP warn (from C++) when the whole batch uses every parameter
            kw = {k: v for k, v in (wrap_kwargs or {}).items()}
            if wrap == "ddp":
                kw.pop("find_unused_parameters", None)
            given = _wrap(model, wrap, kw)
    data = _cast(batch, tdtype)
    torch.manual_seed(seed)
    with torch.inference_mode(False), torch.enable_grad():
        step(given, data)
    params = dict(model.named_parameters())
    grads = {n: _array(params[n].grad) for n in names_of(model)}
    if all(g is None for g in grads.values()):
        raise NoGradientError(
            "step(model, shard) left no .grad on any parameter: it must run the "
            "forward through the model it is given and call backward() on the "
            "loss (no optimizer step, no zero_grad after the backward)."
        )
    return grads


def _array(g: Any) -> np.ndarray | None:
    if g is None:
        return None
    if hasattr(g, "full_tensor"):  # an FSDP2 DTensor gradient
        g = g.full_tensor()
    return np.array(g.detach().to("cpu", torch.float64).numpy(), copy=True)


class UserState:
    """Every global state a check may move, put back on exit (also when it
    raises): torch's CPU and CUDA generators, NumPy's legacy and Python's random
    generators, grad mode, torch's default dtype and intra-op threads."""

    def __enter__(self) -> UserState:
        self.torch = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        )
        self.numpy = np.random.get_state()
        self.python = random.getstate()
        self.grad = torch.is_grad_enabled()
        self.default = torch.get_default_dtype()
        self.threads = torch.get_num_threads()
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)
        torch.set_grad_enabled(self.grad)
        torch.set_default_dtype(self.default)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A process group of world size 1 (gloo, in-memory store) around this
    process's evaluations when none exists: a step that asks
    ``dist.get_world_size()`` / ``get_rank()`` gets 1 / 0, as when the model
    trains in one process. Destroyed on exit. Without gloo the step runs as is."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        yield
        return
    hook = sys.excepthook  # init_process_group prefixes tracebacks with [rank0]
    try:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    except Exception:  # no gloo here: steps that ask for a group raise then
        sys.excepthook = hook
        yield
        return
    try:
        with warnings.catch_warnings():
            # DDP's performance note on a conv weight whose gradient strides differ
            # from its bucket view: about speed, not the gradient, and raised by
            # gradcheck's own one-process wrap (the audit printed it)
            warnings.filterwarnings(
                "ignore", message="Grad strides do not match bucket view strides"
            )
            yield
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


# ====================================================================== one rank
def _wrap(model: torch.nn.Module, wrap: str, kwargs: Mapping[str, Any]) -> Any:
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, **kwargs)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # pragma: no cover - torch < 2.6
        raise UnsupportedInputError(
            f"wrap='fsdp' needs FSDP2 (torch.distributed.fsdp.fully_shard); torch "
            f"{torch.__version__} has none ({exc})."
        ) from exc
    return fully_shard(model, **kwargs)


def execute(
    task: Mapping[str, Any], rank: int, world_size: int, device: str = "cpu"
) -> dict[str, Any]:
    """One rank's part (the process group is initialised): build, check the
    weights against the parent's, wrap, run ``step`` on this rank's shard, read
    every parameter's synchronised ``.grad``. Never raises: an exception is the
    result ({"ok": False, "phase", "error", "traceback"}). After a failure the
    caller leaves the process group (a peer stuck in a collective then fails at
    once instead of waiting for its timeout)."""
    import torch.distributed as dist

    phase = "build"
    started = time.perf_counter()
    try:
        torch.manual_seed(task["seed"])
        model = built_model(task["build"])
        ours = digest(model)
        bad = differing(ours, task["digest"])
        # every rank learns whether any rank's weights differ (DDP would
        # broadcast rank 0's and hide it)
        flag = torch.tensor([1 if bad else 0], dtype=torch.int64)
        if device != "cpu":
            flag = flag.to(device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if bad or int(flag.item()):
            return {
                "ok": False,
                "phase": phase,
                "kind": "weights",
                "differing": bad,
                "error": "build() returned other weights here than in the parent"
                if bad
                else "another rank's build() returned other weights",
            }
        model = model.to(device)
        for p in model.parameters():
            p.grad = None
        phase = "wrap"
        wrapped = _wrap(model, task["wrap"], task["wrap_kwargs"])
        data = unportable(shard(task["batch"], rank, world_size), device)
        torch.manual_seed(task["seed"])
        phase = "step"
        t0 = time.perf_counter()
        with torch.enable_grad():
            task["step"](wrapped, data)
        check = getattr(wrapped, "_check_reducer_finalized", None)
        if check is not None and getattr(wrapped, "require_backward_grad_sync", True):
            check()  # DDP: raises when this rank left a bucket unreduced
        seconds = time.perf_counter() - t0
        phase = "gather"
        params = dict(model.named_parameters())
        grads = {n: _array(params[n].grad) for n in names_of(model)}
        return {
            "ok": True,
            "grads": grads,
            "seconds": seconds,
            "total_seconds": time.perf_counter() - started,
        }
    except BaseException as exc:  # everything becomes a verdict, never a hang
        return {
            "ok": False,
            "phase": phase,
            "kind": "exception",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }


# ====================================================================== spawned
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if os.getcwd() not in paths:
        paths.insert(0, os.getcwd())
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    # gradcheck's models are small: one thread per rank, no oversubscription
    env.setdefault("OMP_NUM_THREADS", "1")
    # gloo binds to the loopback interface (a host name that does not resolve to
    # this machine would otherwise break the pairs)
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    for key in (*TORCHRUN_ENV, "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        env.pop(key, None)
    return env


@dataclass
class RankOutcome:
    """What one rank returned, or why it returned nothing."""

    rank: int
    result: dict[str, Any] | None
    #: "ok", "error" (the rank reported an exception), "timeout" (no answer in
    #: time: killed), "died" (the process ended without an answer)
    state: str
    log: str = ""


class Pool:
    """``world_size`` worker processes in one process group on 127.0.0.1."""

    def __init__(self, world_size: int, backend: str, timeout: float, main: str | None):
        self.world_size, self.backend, self.timeout = world_size, backend, timeout
        self.main = main
        self.dir = tempfile.mkdtemp(prefix="gradcheck-distributed-")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []
        self.tasks = 0
        self.port = 0
        self.spawn_seconds = 0.0
        self.broken = False

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.world_size, self.backend, self.timeout, self.main)

    # -- life ---------------------------------------------------------------------
    def start(self) -> list[RankOutcome] | None:
        """Start the workers and wait until each has joined the process group.
        Returns None when all are ready, else each rank's outcome (a failed or
        timed-out start: the pool is closed)."""
        started = time.perf_counter()
        self.port = _free_port()
        with open(os.path.join(self.dir, "init.pkl"), "wb") as f:
            pickle.dump({"sys_path": list(sys.path), "main": self.main}, f)
        env = _worker_env()
        for rank in range(self.world_size):
            log = open(os.path.join(self.dir, f"log-{rank}.txt"), "wb")  # noqa: SIM115
            self.logs.append(log)
            cmd = [
                sys.executable,
                "-m",
                "gradcheck.backends._torch_distributed_worker",
                self.dir,
                str(rank),
                str(self.world_size),
                self.backend,
                str(self.port),
                repr(float(self.timeout)),
            ]
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=os.getcwd(),
                )
            )
        outcomes = self._wait("ready", self.timeout + 30.0)
        self.spawn_seconds = time.perf_counter() - started
        if all(o.state == "ok" and o.result.get("ok") for o in outcomes):
            return None
        self.close()
        return outcomes

    def run(self, task: Mapping[str, Any]) -> list[RankOutcome]:
        """Run one task on every rank; wait at most the collective timeout plus a
        margin (a rank stuck in a collective reports gloo's own timeout first)."""
        self.tasks += 1
        name = f"task-{self.tasks}"
        with open(os.path.join(self.dir, name + ".pkl"), "wb") as f:
            pickle.dump(dict(task), f)
        for p in self.procs:
            try:
                assert p.stdin is not None
                p.stdin.write(f"{self.tasks}\n".encode())
                p.stdin.flush()
            except OSError:
                pass  # it died: _wait reports it
        outcomes = self._wait(f"result-{self.tasks}", self.timeout * 1.25 + 10.0)
        if not all(o.state == "ok" and o.result.get("ok") for o in outcomes):
            self.broken = True
        return outcomes

    def _wait(self, prefix: str, limit: float) -> list[RankOutcome]:
        """Each rank's ``<prefix>-<rank>.pkl``, until ``limit`` seconds pass. Once
        one rank has failed, the others get a short grace (they fail at once when
        the failed rank leaves the group) and are then given up on."""
        deadline = time.monotonic() + limit
        results: dict[int, RankOutcome] = {}
        grace_until: float | None = None
        while True:
            for rank, proc in enumerate(self.procs):
                if rank in results:
                    continue
                path = os.path.join(self.dir, f"{prefix}-{rank}.pkl")
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        result = pickle.load(f)
                    state = "ok" if result.get("ok") else "error"
                    results[rank] = RankOutcome(rank, result, state)
                elif proc.poll() is not None:
                    results[rank] = RankOutcome(rank, None, "died")
            if len(results) == len(self.procs):
                break
            failed = any(o.state != "ok" for o in results.values())
            now = time.monotonic()
            if failed and grace_until is None:
                grace_until = now + min(10.0, self.timeout)
            if now > deadline or (grace_until is not None and now > grace_until):
                for rank in range(len(self.procs)):
                    results.setdefault(rank, RankOutcome(rank, None, "timeout"))
                self.broken = True
                break
            time.sleep(0.01)
        out = [results[r] for r in range(len(self.procs))]
        if self.broken:
            self.close()
        for o in out:
            if o.state != "ok":
                o.log = self.log(o.rank)
        return out

    def log(self, rank: int) -> str:
        path = os.path.join(self.dir, f"log-{rank}.txt")
        try:
            with open(path, "rb") as f:
                return f.read()[-4000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Ask every worker to leave, then kill whatever is still running."""
        for p in self.procs:
            with contextlib.suppress(OSError, ValueError):
                assert p.stdin is not None
                p.stdin.close()
        deadline = time.monotonic() + 5.0
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5.0)
        logs = {r: self.log(r) for r in range(len(self.logs))}
        for f in self.logs:
            with contextlib.suppress(OSError):
                f.close()
        self._logs = logs
        self.procs, self.logs = [], []
        shutil.rmtree(self.dir, ignore_errors=True)
        if _POOLS.get(self.key) is self:
            del _POOLS[self.key]

    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs)


#: Pools kept alive between checks inside :func:`keep_workers` (the audit).
_POOLS: dict[tuple[Any, ...], Pool] = {}
_KEEP = [0]


@contextlib.contextmanager
def keep_workers() -> Iterator[None]:
    """Inside, a check reuses its worker processes for the next check with the
    same world size, backend and timeout (spawning costs seconds: the audit
    runs many small checks). A pool whose check failed is never reused."""
    _KEEP[0] += 1
    try:
        yield
    finally:
        _KEEP[0] -= 1
        if not _KEEP[0]:
            for pool in list(_POOLS.values()):
                pool.close()


def _main_file(*fns: Any) -> str | None:
    """The script a function defined in ``__main__`` lives in (the workers load
    it as ``__mp_main__``, as multiprocessing's spawn does)."""
    if not any(getattr(f, "__module__", None) == "__main__" for f in fns):
        return None
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path:
        raise UnsupportedInputError(
            "build and step are defined in an interactive session (__main__ has no "
            "file): the spawned processes cannot import them. Define them in a "
            "module (a .py file) and import them from there."
        )
    return os.path.abspath(path)


def check_picklable(label: str, fn: Any) -> None:
    """``fn`` must reach another process by reference (module-level)."""
    try:
        pickle.dumps(fn)
    except Exception as exc:
        qual = getattr(fn, "__qualname__", type(fn).__name__)
        raise UnsupportedInputError(
            f"{label} ({qual}) cannot be sent to the spawned processes: they import "
            f"it by module and name, and a lambda, a local function or a closure "
            f"cannot be imported ({type(exc).__name__}: {exc}). Define {label} at "
            "module level, in an importable module."
        ) from None


def run_spawned(
    task: Mapping[str, Any], world_size: int, backend: str, timeout: float
) -> tuple[list[RankOutcome], dict[str, Any]]:
    """Run ``task`` in ``world_size`` fresh worker processes (or the kept pool
    inside :func:`keep_workers`); every process is ended before returning
    (unless kept). Returns each rank's outcome and facts about the launch."""
    main = _main_file(task["build"], task["step"])
    key = (world_size, backend, timeout, main)
    pool = _POOLS.get(key) if _KEEP[0] else None
    reused = pool is not None and pool.alive() and not pool.broken
    spawn = 0.0
    if not reused:
        if pool is not None:
            pool.close()
        pool = Pool(world_size, backend, timeout, main)
        failed = pool.start()
        if failed is not None and any(_port_taken(o) for o in failed):
            # the free port was taken between choosing it and binding it
            pool = Pool(world_size, backend, timeout, main)
            failed = pool.start()
        spawn = pool.spawn_seconds
        facts = {"port": pool.port, "spawn_seconds": spawn, "reused": False}
        if failed is not None:
            facts["phase"] = "start"
            return failed, facts
        if _KEEP[0]:
            _POOLS[key] = pool
    facts = {"port": pool.port, "spawn_seconds": spawn, "reused": reused}
    try:
        outcomes = pool.run(task)
    finally:
        if not _KEEP[0] or pool.broken:
            pool.close()
    return outcomes, facts


def _port_taken(o: RankOutcome) -> bool:
    text = f"{(o.result or {}).get('error', '')} {o.log}".lower()
    return "address already in use" in text or "eaddrinuse" in text


# ====================================================================== torchrun
def in_torchrun() -> bool:
    """This process was started by torchrun (or another torch.distributed
    launcher): RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set, or a
    process group is initialised already."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True
    return all(k in os.environ for k in TORCHRUN_ENV)


def launched_world_size(default: int) -> int:
    """The world size of the launched job: the initialised group's, else the
    WORLD_SIZE the launcher set (``default`` when neither exists)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", default))


_CALLS = itertools.count()


def run_in_torchrun(
    task: Mapping[str, Any], backend: str, timeout: float
) -> tuple[list[RankOutcome], dict[str, Any]]:
    """This process is one rank of a launched job: run its part and exchange the
    results of every rank through the process group's store (not a collective:
    a rank stuck in DDP's all-reduce cannot pair with it)."""
    import torch.distributed as dist

    started = time.perf_counter()
    if not dist.is_initialized():
        # left initialised for the rest of the process: torchrun's store keeps
        # the first group's keys, a second group under the same names would
        # connect to stale peers. A later check (or the user's training)
        # reuses it.
        dist.init_process_group(
            backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout)
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    spawn = time.perf_counter() - started
    device = "cpu"
    if dist.get_backend() == "nccl":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    result = execute(task, rank, world, device)
    store = dist.distributed_c10d._get_default_store()
    call = next(_CALLS)
    store.set(f"gradcheck/{call}/{rank}", pickle.dumps(result))
    outcomes: list[RankOutcome] = []
    keys = [f"gradcheck/{call}/{r}" for r in range(world)]
    with contextlib.suppress(Exception):  # a missing rank is reported below
        store.wait(keys, datetime.timedelta(seconds=timeout * 1.25 + 10.0))
    for r, key in enumerate(keys):
        try:
            got = pickle.loads(store.get(key)) if store.check([key]) else None
        except Exception:
            got = None
        state = "timeout" if got is None else ("ok" if got.get("ok") else "error")
        outcomes.append(RankOutcome(r, got, state))
    facts = {
        "spawn_seconds": spawn,
        "torchrun": True,
        "rank": rank,
        "world_size": world,
        "backend": dist.get_backend(),
    }
    return outcomes, facts


def wrap_available(wrap: str) -> str | None:
    """Why ``wrap`` cannot run with this torch (None: it can)."""
    import torch.distributed as dist

    if not dist.is_available():
        return f"torch {torch.__version__} was built without torch.distributed."
    if wrap == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            return (
                f"wrap='fsdp' needs FSDP2 (torch.distributed.fsdp.fully_shard), which "
                f"torch {torch.__version__} lacks."
            )
    return None
