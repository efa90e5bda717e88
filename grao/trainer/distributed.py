"""Several processes: the process group, DDP / FSDP2 set-up, and the few collectives the step needs.

Data parallelism runs on torch's own engines, never a hand-written gradient all-reduce:

* ``parallel="ddp"`` (default): the model is wrapped in ``DistributedDataParallel`` through
  :class:`HiddenAndHead`, a module whose forward is what the losses need (the backbone's last hidden
  states and the lm_head weight, never the [tokens x vocab] logits). Going through the wrapper's forward
  is what makes DDP reduce the gradients of that pass; ``no_sync`` skips it on every micro-batch but a
  rank's last (see ``grao.trainer.forward.PolicyForward``). DDP averages over ranks, so the trainer
  scales each rank's loss by world_size x (its share of the global normaliser): the update equals the
  one-process update on the global batch, for unequal shards too.
* ``parallel="fsdp"`` (or ``accelerate launch --use_fsdp --fsdp_version 2``): FSDP2 ``fully_shard`` on
  every decoder layer and on the root; the loss path calls :func:`_fsdp_hidden_and_head`, registered with
  ``register_fsdp_forward_method``, which returns the root's all-gathered *full* lm_head weight (a tied
  embedding stays tied, and its gradient is reduce-scattered like every other one). Fused-loss
  integrations that meet an FSDP2 lm_head often call ``full_tensor()`` on the DTensor weight; with the
  default ``grad_placements`` its backward keeps only the rank's own shard of the rank's own gradient
  (no sum over ranks), right for a frozen head only, so the root's own all-gather is used here.

Rollouts run on the unwrapped model (``generate`` makes no collective with DDP; under FSDP every unit
is gathered once for the rollout, :func:`fsdp_full_params`). FSDP1, DeepSpeed and Megatron launches are
refused with an error.

Shutdown: :func:`shutdown_distributed` destroys the process group so that the group's last reference is a
Python one, dropped inside it (see its docstring): a gloo group whose last reference goes away in a C++
destructor that holds the GIL (DDP's Reducer) can deadlock on exit. :func:`init_distributed` registers it
at exit too, for a run that never calls it.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import os
import types
import weakref
from typing import Any

import torch

from grao.trainer.model import lm_parts


def process_group():
    """torch.distributed when a process group of several ranks is up, else None."""
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").lower() in ("1", "true", "yes")


def launch_parallel(parallel: str = "ddp") -> str:
    """The parallelism of a multi-process run: ``parallel`` ("ddp" | "fsdp"), or "fsdp" when
    ``accelerate launch`` was asked for FSDP version 2 (``ACCELERATE_USE_FSDP`` with ``FSDP_VERSION=2``).
    FSDP version 1, DeepSpeed and Megatron launches are refused with NotImplementedError."""
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM"):
        if _env_true(var):
            raise NotImplementedError(f"{var} is set: the grao trainer supports DDP-style data parallelism "
                                      f"(replicated model, gradient all-reduce) and FSDP2; DeepSpeed / Megatron "
                                      f"sharding is not supported. Launch with accelerate launch --multi_gpu, "
                                      f"--use_fsdp --fsdp_version 2, or torchrun.")
    if _env_true("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1").strip()
        if version != "2":
            raise NotImplementedError(f"ACCELERATE_USE_FSDP is set with FSDP_VERSION={version}: the grao trainer "
                                      f"supports FSDP2 (fully_shard) only; launch with --fsdp_version 2 (or "
                                      f"--parallel fsdp), or use plain data parallelism (--multi_gpu)")
        return "fsdp"
    return parallel


def init_distributed(want_cuda: bool) -> tuple[int, int, int]:
    """(rank, world_size, local_rank). With ``WORLD_SIZE > 1`` in the environment (set by ``torchrun`` and
    ``accelerate launch``) the default process group is created (NCCL for CUDA, else gloo) unless the
    caller already did it. FSDP1 / DeepSpeed / Megatron launches are refused (:func:`launch_parallel`)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() <= 1:
            return 0, 1, 0
    elif int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, 0
    launch_parallel()
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local)
        # imported before the group exists: its functions' defaults (group=group.WORLD, evaluated at import,
        # an import DDP makes) would otherwise keep the default group alive until the interpreter's end
        with contextlib.suppress(ImportError):
            importlib.import_module("torch.distributed.nn")
        dist.init_process_group("nccl" if want_cuda else "gloo")
        # a run that never calls shutdown_distributed (a script using Trainer) still tears the group down
        # while the interpreter is whole, not in its finalisation (no barrier: a rank may be exiting on an error)
        atexit.register(shutdown_distributed, barrier=False)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


# Every DistributedDataParallel wrapper made by wrap_ddp, weakly: shutdown_distributed detaches each from the
# process group before destroying it, wherever the wrapper is still referenced (a Trainer, a traceback).
_DDP_WRAPPERS: weakref.WeakSet = weakref.WeakSet()


def _detach_ddp(ddp) -> None:
    """Drop a DDP wrapper's references to the process group: its C++ ``Reducer`` and ``Logger`` (the logger
    holds the reducer, the reducer a C++ reference to the group) and its ``process_group``. The wrapper
    cannot run a forward afterwards."""
    for name in ("logger", "reducer", "process_group"):
        vars(ddp).pop(name, None)


def shutdown_distributed(barrier: bool = True) -> None:
    """Destroy the process groups if any is up (end of ``grao train``; also registered at exit by
    :func:`init_distributed`). ``barrier``: first wait for every rank (off on an error path, where another
    rank may be stuck in a collective or gone).

    Every DDP wrapper of :func:`wrap_ddp` is detached from the group first, and the group is destroyed while
    this function holds its own Python references, dropped last: the group's destructor then runs here,
    without the GIL (or, should other code still hold the group in Python, when that lets go: through the
    same binding, also without the GIL).

    Why: ``~ProcessGroupGloo`` joins the group's worker threads. A worker that finished a collective may
    still hold that work (a barrier holds the works before it) and so the last reference to a tensor Python
    has let go; dropping it decrefs the tensor's PyObject, which needs the GIL
    (``TensorImpl::decref_pyobject`` -> ``gil_scoped_acquire``). If the group's last reference is dropped in
    a C++ destructor that holds the GIL, the join waits for that worker and the worker for the GIL: a
    deadlock on exit. That was ``grao train`` under DDP: after ``destroy_process_group`` the last reference
    was the DDP ``Reducer``'s, dropped when the Trainer was freed (``pybind11 ... Reducer ...
    dealloc_without_manipulating_gil`` -> ``~Reducer`` -> ``~ProcessGroupGloo`` -> ``std::thread::join``),
    a stack taken with ``py-spy dump --native`` of a hung rank. torch binds its process-group classes with
    a holder that releases the GIL before destructing them, so a *Python* last reference is safe; a C++
    one is not (pytorch/pytorch#56297, "Audit destructors of classes bound using pybind11::class_ to see if
    they can block; such cases can deadlock", quoting this destructor; #56381 and #154976 release the GIL
    in the bindings' destructors; #56017 shows the same worker stack in ``decref_pyobject``).
    tests/shutdown_worker.py hung within a few trials with the old order. Under FSDP2 torch's DTensor
    caches keep the device mesh, and so the group, until the process ends; its destructor never runs.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    from torch.distributed import distributed_c10d as c10d
    # ours: the default group and every other one (FSDP2's device mesh, ...), held past the destroy
    groups = [dist.group.WORLD, *getattr(getattr(c10d, "_world", None), "pg_map", {})]
    if barrier:
        dist.barrier()
    for ddp in list(_DDP_WRAPPERS):
        _detach_ddp(ddp)
    gc.collect()  # wrappers of other code left in reference cycles: their reducers go while we hold the group
    dist.destroy_process_group()
    groups.clear()  # the last references, Python ones: ~ProcessGroupGloo joins its threads here, GIL released


def barrier() -> None:
    dist = process_group()
    if dist is not None:
        dist.barrier()


def shard_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of ``total`` items; sizes differ by at most one."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few floats over ranks (float64); the values themselves in one process."""
    dist = process_group()
    if dist is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int, device) -> int:
    """The largest of one int over ranks; the value itself in one process."""
    dist = process_group()
    if dist is None:
        return int(value)
    t = torch.tensor([int(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    dist = process_group()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters and gradients); a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


# ---------------------------------------------------------------------------------------------------- DDP


class HiddenAndHead(torch.nn.Module):
    """forward(input_ids, attention_mask, **backbone_kwargs) -> (last hidden states [N, L, D], lm_head weight [V, D],
    bias | None); ``backbone_kwargs``: e.g. the packed layout's position ids and structure (``grao.packing``).

    The module DDP wraps: its forward is the part of the causal LM the losses use, so that the loss
    path goes through ``DistributedDataParallel.forward`` (which is what arms DDP's gradient reduction for
    the backward that follows). It owns no parameters of its own: they are the causal LM's.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self._parts = lm_parts(model)  # a tuple: not registered as submodules a second time

    def forward(self, input_ids, attention_mask, **kwargs):
        backbone, head = self._parts
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
        return hidden, head.weight, getattr(head, "bias", None)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(HiddenAndHead(model))``. DDP broadcasts rank 0's parameters and buffers on
    construction, so every rank starts from the same weights. No buffer broadcast before each forward: a
    causal LM's buffers are constants (rotary tables), and a per-forward broadcast would be a collective
    that ranks making different numbers of micro-batches could not match."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # torch >= 2.13 names the option forward_sync_buffers (buffers still synced once at construction)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
    ddp = DistributedDataParallel(HiddenAndHead(model), device_ids=ids, **no_buffer_sync)
    _DDP_WRAPPERS.add(ddp)  # detached from the group by shutdown_distributed
    return ddp


# ---------------------------------------------------------------------------------------------------- FSDP2


def broadcast_from_rank0(model: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank before FSDP2 shards them (FSDP2's fully_shard
    has no ``sync_module_states``; DDP does this itself in its constructor)."""
    dist = process_group()
    if dist is None:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, 0)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a HF model (its ``_no_split_modules`` classes, else ``base_model.layers``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        found = list(getattr(model.base_model, "layers", None) or [])
    if not found:
        raise TypeError(f"{type(model).__name__}: no decoder layers found to shard (neither _no_split_modules "
                        f"nor base_model.layers)")
    return found


def _fsdp_hidden_and_head(model, input_ids, attention_mask, **kwargs):
    """FSDP forward method of the root: (last hidden states [N, L, D], lm_head weight [V, D], bias [V] or
    None). Called through the root's FSDP hooks (``register_fsdp_forward_method``), so the weight returned is
    the root's all-gathered full parameter and its gradient is reduce-scattered with the others."""
    backbone, head = lm_parts(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
    return hidden, head.weight, getattr(head, "bias", None)


def _fsdp_backbone_forward(self, **kwargs):
    """The backbone's forward, through the root's FSDP hooks (shared-prompt sampling's prefill and decode)."""
    return self.base_model(**kwargs)


def fsdp_shard(model, device: torch.device, world_size: int):
    """Shard ``model`` in place with FSDP2: every decoder layer, then the root (embeddings, norm, lm_head).

    The root is not resharded after its forward (it would be all-gathered again at once for the backward
    and for the loss that uses the lm_head weight after the forward). Adds ``model.grao_hidden_and_head``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    lm_parts(model)  # a clear error before sharding for a model the loss path cannot use
    mesh = init_device_mesh(device.type, (world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    model.grao_hidden_and_head = types.MethodType(_fsdp_hidden_and_head, model)
    register_fsdp_forward_method(model, "grao_hidden_and_head")
    model.grao_backbone_forward = types.MethodType(_fsdp_backbone_forward, model)  # grao.sampling's forwards
    register_fsdp_forward_method(model, "grao_backbone_forward")
    return model


@contextlib.contextmanager
def fsdp_full_params(model):
    """FSDP: all-gather every unit once and keep them unsharded (no resharding after forward) for the
    duration, e.g. a rollout, whose number of forward calls differs between ranks; reshard after (the
    root stays gathered, as :func:`fsdp_shard` set it up)."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()


def fsdp_full_state_dict(model) -> dict:
    """The full (unsharded) state dict on rank 0's CPU; every rank must call it. A tied lm_head appears
    under both names in the gathered dict: only the model's own parameter/buffer names are kept, as
    ``save_pretrained`` does."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    named = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in full.items() if k in named}
