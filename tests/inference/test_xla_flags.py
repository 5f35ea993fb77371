"""The CLI's decoding flags: added once, never over the user's own, never after a backend started."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mamba_llama_jax.inference import xla_flags
from mamba_llama_jax.inference.xla_flags import DECODE_FLAGS, loops_in_command_buffers, use_decode_flags

ROOT = Path(__file__).parents[2]


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(xla_flags, "_backend_started", lambda: False)


@pytest.mark.parametrize("before,after", [
    ({}, DECODE_FLAGS),
    ({"XLA_FLAGS": "--xla_backend_optimization_level=0"}, "--xla_backend_optimization_level=0 " + DECODE_FLAGS),
])
def test_added_to_what_is_there(fresh, before, after):
    env = dict(before)
    assert use_decode_flags(env) == "added"
    assert env["XLA_FLAGS"] == after
    assert use_decode_flags(env) == "user" and env["XLA_FLAGS"] == after  # the second call adds nothing


@pytest.mark.parametrize("flags", ["--xla_gpu_enable_command_buffer=", "--xla_gpu_enable_command_buffer=+FUSION -x=1"])
def test_the_users_setting_stands(fresh, flags):
    env = {"XLA_FLAGS": flags}
    assert use_decode_flags(env) == "user" and env == {"XLA_FLAGS": flags}


def test_nothing_changes_once_a_backend_started(monkeypatch):
    monkeypatch.setattr(xla_flags, "_backend_started", lambda: True)
    env = {"XLA_FLAGS": "-x=1"}
    assert use_decode_flags(env) == "late" and env == {"XLA_FLAGS": "-x=1"}


def test_backend_started_is_read_from_jax():
    import jax

    jax.devices()
    assert xla_flags._backend_started()


def test_a_decoding_command_runs_under_the_flags():
    """In a fresh process, as `run.py generate` starts: the command sees the flags, and XLA accepts them (an
    unknown or malformed flag aborts the process when the backend starts)."""
    code = ("import os, jax, jax.numpy as jnp\n"
            "from mamba_llama_jax import cli\n"
            "def probe(args):\n"
            "    loop = jax.jit(lambda x: jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 2), x))\n"
            "    print(os.environ['XLA_FLAGS'], '|', int(loop((0, jnp.ones(())))[1]))\n"
            "cli.cmd_generate = probe\n"
            "raise SystemExit(cli.main(['generate', '--prompt', 'x']))\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{DECODE_FLAGS} | 8"


@pytest.mark.parametrize("flags,loops", [
    ("", False), (DECODE_FLAGS, True), ("-x=1 " + DECODE_FLAGS + " -y=2", True),
    ("--xla_gpu_enable_command_buffer=", False), ("--xla_gpu_enable_command_buffer=FUSION,WHILE", True),
    ("--xla_gpu_enable_command_buffer=+CONDITIONAL", False), ("--xla_gpu_enable_command_buffer=+WHILE,-WHILE", False),
    (DECODE_FLAGS + " --xla_gpu_enable_command_buffer=", False),  # the last setting wins
])
def test_loops_in_command_buffers(flags, loops):
    assert loops_in_command_buffers(flags) is loops
