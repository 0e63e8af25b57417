"""Simulated accelerator devices on a CPU-only machine (a test helper, not a test module).

Inside :func:`simulated`, tensors can live on ``meta:0``, ``meta:1``, ...: their data stay on the
CPU (every operation computes real numbers with the CPU kernels), but they report that device and
are checked the way CUDA checks its tensors, so code that would fail on a GPU, or on a model split
over two GPUs, fails here with the error CUDA gives:

- the tensor arguments of an operation must all be on one device, except 0-dim CPU tensors in
  pointwise operations (CUDA takes them as scalars), CPU index tensors of ``x[idx]`` indexing (the
  indices only) and ``dst.copy_(src)`` (which copies between devices);
- ``.to(device)``, ``.cpu()`` and factories with ``device=`` move between devices (``torch.tensor(data,
  device=...)`` included); reading values (``.item()``, ``.tolist()``, ``int(t)``) works.

(The device *type* is ``meta`` because a CPU-only PyTorch build refuses to index a tensor that claims
to be ``cuda``; no code under test treats ``meta`` or ``cuda`` specially.) ``torch.inference_mode``
acts as ``torch.no_grad`` inside (wrapper tensors cannot be inference tensors; the device rules are
the same). Inputs made outside the block must be plain CPU tensors or models loaded inside it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
KIND = "meta"
# indexing that CUDA allows with CPU index tensors (the ``indices`` argument only)
_CPU_INDICES = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# operations that take a 0-dim CPU tensor as a scalar besides the pointwise ones
_CPU_SCALARS = {aten.where.self, aten.masked_fill.Tensor, aten.masked_fill_.Tensor, *_CPU_INDICES}


class SimTensor(torch.Tensor):
    """A CPU tensor (``elem``) that says it is on a simulated device."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device):
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=device, requires_grad=elem.requires_grad,
        )
        r.elem = elem
        return r

    def __repr__(self) -> str:
        return f"SimTensor({self.elem!r}, device={self.device})"

    def tolist(self):
        return self.elem.tolist()

    def __tensor_flatten__(self):
        return ["elem"], self.device

    @staticmethod
    def __tensor_unflatten__(inner, device, outer_size, outer_stride):
        return SimTensor(inner["elem"], device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _is_sim(t) -> bool:
    return isinstance(t, SimTensor)


def _run(func, args, kwargs, target: torch.device | None = None):
    flat, _ = tree_flatten((args, kwargs))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    if any(not _is_sim(t) and t.device.type != "cpu" for t in tensors):
        raise AssertionError(f"simdevice: a real {tensors[0].device} tensor reached {func}")
    devices = {t.device for t in tensors if _is_sim(t)}
    if len(devices) > 1 and func is not aten.copy_.default:
        names = " and ".join(sorted(map(str, devices)))
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, {names}! ({func})")
    dev = next(iter(devices)) if devices else target
    if devices and func is not aten.copy_.default:  # (copy_ copies between devices, as on CUDA)
        allowed = {id(t) for t in tree_flatten(args[1])[0]} if func in _CPU_INDICES else set()
        scalars = func in _CPU_SCALARS or torch.Tag.pointwise in func.tags
        for t in tensors:
            if not _is_sim(t) and id(t) not in allowed and (t.dim() > 0 or not scalars):
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                                   f"devices, {dev} and cpu! ({func})")
    # a device argument (factories, .to): run on the CPU, label the result with the device asked for
    args, kwargs = list(args), dict(kwargs)
    names = [a.name for a in func._schema.arguments]
    want = None
    if kwargs.get("device") is not None:
        want, kwargs["device"] = kwargs["device"], torch.device("cpu")
    elif "device" in names and names.index("device") < len(args) and args[names.index("device")] is not None:
        i = names.index("device")
        want, args[i] = args[i], torch.device("cpu")
    if want is not None:
        want = torch.device(want)
        dev = want if want.type == KIND else None
    unwrap = lambda e: e.elem if _is_sim(e) else e  # noqa: E731
    out = func(*tree_map(unwrap, tuple(args)), **tree_map(unwrap, kwargs))
    schema = func._schema
    if schema.arguments and schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write:
        return args[0]  # in place: the same tensor object
    outs = [a.name for a in schema.arguments if a.is_out]
    if outs:
        return kwargs[outs[0]] if len(outs) == 1 else tuple(kwargs[n] for n in outs)
    if dev is None:
        return out
    return tree_map(lambda e: SimTensor(e, dev) if isinstance(e, torch.Tensor) and not _is_sim(e) else e, out)


class _Factories(TorchDispatchMode):
    """Operations without a simulated tensor argument that ask for a simulated device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        if any(_is_sim(t) for t in flat):
            return _run(func, args, kwargs)
        d = kwargs.get("device")
        if d is not None and torch.device(d).type == KIND:
            return _run(func, args, kwargs, target=torch.device(d))
        return func(*args, **kwargs)


@contextlib.contextmanager
def simulated() -> Iterator[None]:
    saved = torch.inference_mode
    torch.inference_mode = lambda mode=True: torch.no_grad() if mode else contextlib.nullcontext()
    lift = torch._C._only_lift_cpu_tensors()
    torch._C._set_only_lift_cpu_tensors(True)  # torch.tensor(data, device=...): made on the CPU, then moved
    try:
        with _Factories():
            yield
    finally:
        torch.inference_mode = saved
        torch._C._set_only_lift_cpu_tensors(lift)
