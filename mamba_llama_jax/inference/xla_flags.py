"""XLA flags for decoding, set in the environment before the JAX backend starts.

The decode loop is a `lax.while_loop` of ~195 kernels a step. With while loops and conditionals recorded as CUDA
graphs (command buffers) the GPU runs a step without the host launching each kernel: on the H100, 2.3-2.7 % faster
steps at batches 1 and 64 (benchmarks/results/generate_s32.md). XLA reads XLA_FLAGS once, when the first backend
starts, so this must run before anything touches a device; other backends ignore the flag.
"""

from __future__ import annotations

import os
from typing import Literal, MutableMapping

COMMAND_BUFFER = "--xla_gpu_enable_command_buffer"
DECODE_FLAGS = COMMAND_BUFFER + "=+WHILE,+CONDITIONAL"

Outcome = Literal["added", "user", "late"]


def _command_buffer_setting(flags: str) -> str | None:
    """The value of the last `--xla_gpu_enable_command_buffer=` in XLA_FLAGS `flags` (XLA takes the last), None
    where there is none."""
    value = None
    for flag in flags.split():
        if flag.startswith(COMMAND_BUFFER + "="):
            value = flag.split("=", 1)[1]
    return value


def _backend_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def use_decode_flags(environ: MutableMapping[str, str] | None = None) -> Outcome:
    """Add DECODE_FLAGS to XLA_FLAGS. Returns "added"; "user" where XLA_FLAGS already sets command buffers (the
    user's choice stands, `XLA_FLAGS=--xla_gpu_enable_command_buffer=` turns them off); "late" where a backend has
    started already, so a change would be silently ignored and none is made."""
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if _command_buffer_setting(flags) is not None:
        return "user"
    if _backend_started():
        return "late"
    env["XLA_FLAGS"] = (flags + " " + DECODE_FLAGS).strip()
    return "added"


def loops_in_command_buffers(flags: str) -> bool:
    """Whether XLA_FLAGS `flags` record while loops as CUDA graphs. The JAX profiler does not see the kernels inside
    such a graph (a traced decode step shows ~3 kernels: benchmarks/results/decode_profile_s32_cmdbuf.md), so
    kernel breakdowns need them off. The last setting wins, as in XLA; "+X" / "-X" edit XLA's default set, which
    has no WHILE."""
    value = _command_buffer_setting(flags)
    if not value:
        return False
    modes = [m.strip().upper() for m in value.split(",") if m.strip()]
    if not any(m[0] in "+-" for m in modes):
        return "WHILE" in modes
    loops = False
    for m in modes:
        if m[1:] == "WHILE":
            loops = m[0] == "+"
    return loops
