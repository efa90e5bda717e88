"""Autocast for the fused ops: cast the float inputs once, as ``nn.Linear`` would, then compute with autocast off.

Inside ``torch.autocast`` (CPU or CUDA) the autocast kernel registered for each op casts ``hidden``, ``weight``
and ``bias`` (fp32 / bf16 / fp16 on the autocast device; float64 is left alone) to the autocast dtype, then runs
the op with autocast excluded, so every output is the op's result on the cast inputs and the casts are ordinary
autograd ``to`` nodes. Other float tensors (the GRAO rewards) are not cast; ``torch.library.register_autocast``
would cast them too, hence this rule of our own (why it exists: docs/kernels.md).
"""

from __future__ import annotations

import torch

#: Device types whose autocast the ops follow, and their dispatch keys.
AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
AUTOCAST_DEVICES = tuple(AUTOCAST_KEYS)
_CASTABLE = (torch.float32, torch.bfloat16, torch.float16)
_LIB = torch.library.Library("grao_kernels", "IMPL")  # held here: the registrations live as long as it does


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in effect for ``device_type`` ("cpu", "cuda"), or None when autocast is off there."""
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def effective_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ``t`` has once the ops' autocast rule has run: the autocast dtype of its device for
    fp32 / bf16 / fp16 tensors when autocast is on there, else its own dtype."""
    if t.dtype not in _CASTABLE:
        return t.dtype
    return autocast_dtype(t.device.type) or t.dtype


def _cast(t, dtype: torch.dtype, device_type: str):
    if isinstance(t, torch.Tensor) and t.dtype in _CASTABLE and t.device.type == device_type and t.dtype != dtype:
        return t.to(dtype)
    return t


def register_autocast_rule(name: str, cast_args: tuple[int, ...]) -> None:
    """Register the autocast kernel of the custom op ``grao_kernels::<name>`` for CPU
    and CUDA: positional arguments ``cast_args`` are cast to the autocast dtype (see the module docstring),
    then the op runs with that device's autocast excluded. ``cast_args=()``: nothing cast, autocast off
    (for a backward op, whose saved inputs were cast in the forward)."""
    overload = getattr(torch.ops.grao_kernels, name).default
    for device_type, key_name in AUTOCAST_KEYS.items():
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

        def kernel(_keyset, *args, _device_type=device_type, _excluded=keyset, **kwargs):
            dtype = torch.get_autocast_dtype(_device_type)
            args = tuple(_cast(a, dtype, _device_type) if i in cast_args else a for i, a in enumerate(args))
            with torch._C._ExcludeDispatchKeyGuard(_excluded):
                return overload(*args, **kwargs)

        _LIB.impl(name, kernel, key_name, with_keyset=True)
