"""Test-side name for the CPU shim; the shim itself lives in ``megatron_meml.model.cpu_compat`` (the checkpoint
converter's rank processes need it too), whose docstring lists what it redirects and why."""
from megatron_meml.model.cpu_compat import install_cpu_shim

__all__ = ["install_cpu_shim"]
