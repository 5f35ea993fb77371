"""What every benchmark result records beside its figures: the date, the device and the package versions (one
helper for all of benchmarks/, so results stay comparable)."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import os
import platform
import subprocess
import sys

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "jax-cuda12-plugin", "jax-cuda13-plugin",
            "triton", "torch", "transformers")


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Python's version and those of `packages` that are installed (absent ones are left out)."""
    out = {"python": platform.python_version()}
    for n in packages:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return out


def device() -> str:
    """The GPU as nvidia-smi names it (name, memory, driver); else JAX's device kind when JAX is loaded; else
    the CPU."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        if smi:
            return smi.splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        return f"{jax.default_backend()}: {jax.devices()[0].device_kind}"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def gpu_count() -> int:
    """GPUs nvidia-smi lists (0 without one or without nvidia-smi); no jax import, so a parent process can ask
    while its workers own the devices."""
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(ln.startswith("GPU ") for ln in smi.splitlines())


def now() -> str:
    """UTC date and time, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
