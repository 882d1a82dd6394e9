"""CPU compatibility shim that lets the real Megatron-Core run on CPU with gloo (no CUDA build of torch).

It began as a test-only helper (tests/megatron_cpu.py, which now re-exports this module). It lives in the
package because code that users run on CPU needs it too: the checkpoint converter's rank processes
(``checkpoints_convert verify``) and the CPU demo build real Megatron models. It is a no-op when CUDA is
available, so GPU runs never see it. The training code itself never calls it.

Megatron-Core assumes CUDA in a handful of places. This module redirects exactly those:

* ``torch.cuda.current_device()`` -> ``"cpu"`` (used as a ``device=`` argument when allocating buffers);
* CUDA RNG get/set (torch.cuda and Megatron's ``tensor_parallel.random`` helpers) -> the CPU generator;
* ``torch.cuda.synchronize`` / ``empty_cache`` -> no-ops;
* ``torch.cuda.current_stream()`` -> torch's CPU stream (``torch.cpu.current_stream()``, whose ``wait_event`` /
  ``wait_stream`` do nothing): megatron-core's DDP grad sync (``param_and_grad_buffer.start_grad_sync``) asks for
  the current stream to wait on CUDA-graph events, which a CPU run never records;
* tensor factories called with ``device="cuda"`` inside ``pipeline_parallel.schedules``, ``optimizer.optimizer``,
  ``optimizer.clip_grads``, ``megatron.core.utils`` -> CPU (a proxy of the ``torch`` module in those modules only);
* ``Tensor.type()`` reports ``torch.cuda.*`` names for CPU tensors (optimizer asserts compare those strings);
* ``Tensor.cuda()`` returns the tensor itself (tied embeddings under PP move the shared weight with it before
  their first-stage/last-stage all-reduce).

Models must be given an explicit causal mask (the default one is built on "cuda"):
``megatron_meml.model.provider.causal_mask``.
"""
from __future__ import annotations

import types

import megatron.core.optimizer.clip_grads as clip_grads
import megatron.core.optimizer.optimizer as optimizer
import megatron.core.pipeline_parallel.schedules as schedules
import megatron.core.utils as mcore_utils
import torch
from megatron.core.tensor_parallel import random as tp_random

_INSTALLED = False
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like",
              "full_like", "randn", "rand", "randint")


def _cpu_device(dev):
    if dev is None:
        return None
    if isinstance(dev, int):
        return torch.device("cpu")
    s = str(dev)
    return torch.device("cpu") if s.startswith("cuda") else dev


class _TorchProxy(types.ModuleType):
    """Behaves like ``torch`` but allocates on CPU when asked for "cuda"."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args, __f=attr, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                kwargs.pop("pin_memory", None)
                return __f(*args, **kwargs)
            return factory
        return attr


def install_cpu_shim() -> None:
    """Install the redirections (idempotent; nothing when CUDA is available). Call before building models."""
    global _INSTALLED
    if _INSTALLED or torch.cuda.is_available():
        return
    _INSTALLED = True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: torch.cpu.current_stream()
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)


    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


    proxy = _TorchProxy()
    for mod in (schedules, optimizer, clip_grads, mcore_utils):
        mod.torch = proxy

    orig_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = orig_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        return orig_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type
    torch.Tensor.cuda = lambda self, *a, **k: self
