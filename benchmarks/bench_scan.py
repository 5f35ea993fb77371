"""Chunked SSD scan on one GPU, all four issue shapes in one run within a fixed wall budget: this project's Pallas
kernel (Triton; on a Hopper GPU also its Mosaic GPU forward, `pallas_mgpu[c64]`, whose fwd+bwd column runs the
Triton backward), the pure-JAX chunked SSD, the JAX associative scan and (if its source sits in .anchors/mamba/)
mamba_ssm's Triton `mamba_chunk_scan_combined`.

Same inputs for all (bf16 x/B/C, fp32 dt, dt_bias + softplus inside, D, g = h), forward and forward+backward (all
gradients for a cotangent of y). JAX: each call timed by the host clock around call + block_until_ready (median,
includes ~0.1 ms of dispatch), plus the mean of back-to-back calls (dispatch hidden: device throughput). mamba_ssm:
`triton.testing.do_bench` median (CUDA events) plus the same host clock.

Why the run is laid out as it is. mamba_ssm autotunes every Triton kernel on its first call for each new key
(chunk, head dim, state size, heads): ~100 s of compiles at state 64 and again at state 128, which is what cut the
last run short. So its warm-up runs in two child processes (one per state size, so the compiles go in parallel)
started first, while the parent compiles the Pallas kernels ahead of time (host work only: no XLA autotuning that
could disturb the children's GPU timings) and makes the inputs. Nothing is timed until the children are warm;
then the parent times every JAX implementation (the children idle), then each child times its shapes in turn.
A warm-up still running at its deadline is interrupted (its shape is reported skipped) so the rest keeps its
numbers; every implementation has its own timing budget, and one whose turn comes too late is skipped, never
left half-measured. The associative scan runs only at the two short shapes (it materialises every state).

    PYTHONPATH=$PWD JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false \\
        python3 benchmarks/bench_scan.py --out benchmarks/results --budget 225
    python3 benchmarks/bench_scan.py --tiny       # CPU smoke run: tiny shapes, kernels interpreted, a stand-in
                                                  # for mamba_ssm that exercises the child-process protocol
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch children share the GPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(8, 2048, 9, 64, 64, 9), (8, 2048, 24, 64, 64, 24), (4, 8192, 24, 64, 64, 24), (2, 16384, 32, 64, 128, 32)]
# CPU smoke shapes: two state sizes, so two children, as in the real run; the second splits the head dim
TINY_SHAPES = [(1, 64, 2, 16, 16, 2), (1, 48, 2, 32, 32, 2)]
H100_BW = 3.0e12  # B/s, device-to-device copy measured on this workplace's H100 (spec: 3.35 TB/s)
H100_BF16 = 790e12  # FLOP/s, dense bf16 product measured there (spec: 989 TFLOP/s)
MARK = "@@BENCH "  # prefix of the children's protocol lines on stdout
AFTER_WARM_S = 85.0  # what the run needs once the children are warm: JAX compiles + timings, mamba timings


# --------------------------------------------------------------------------------------------- shared helpers


def inputs(shape, seed=0):
    """Host float32 inputs, identical in the parent and the children (same generator, same order)."""
    b, l, h, p, n, g = shape
    r = np.random.default_rng(seed)
    f = np.float32
    return dict(
        x=r.standard_normal((b, l, h, p), f), dt=(r.standard_normal((b, l, h), f) - 1.0).astype(f),
        A=-np.exp(r.uniform(0.0, 2.7, (h,))).astype(f), B=r.standard_normal((b, l, g, n), f),
        C=r.standard_normal((b, l, g, n), f), D=r.standard_normal((h,), f),
        dt_bias=(r.standard_normal((h,), f) * 0.5).astype(f), dy=r.standard_normal((b, l, h, p), f))


def min_bytes(shape, bwd: bool) -> int:
    """Each input read once, each output written once (bf16 x/B/C/y, fp32 dt)."""
    b, l, h, p, n, g = shape
    fwd = b * l * h * p * 2 * 2 + 2 * b * l * g * n * 2 + b * l * h * 4
    if not bwd:
        return fwd
    return fwd + 2 * b * l * h * p * 2 + 2 * b * l * g * n * 2 + b * l * h * 4  # + dy, dx, dB, dC, ddt


def flops(shape, chunk: int, bwd: bool) -> float:
    """Matrix-product FLOPs of the chunked algorithm (full chunk x chunk tiles, as the kernels compute them)."""
    b, l, h, p, n, g = shape
    per_pos = 2 * chunk * (n + p) + 2 * 2 * n * p
    return b * l * h * per_pos * (3.5 if bwd else 1.0)  # bwd: the forward's products recomputed + ~2.5x more


def rates(shape, chunk: int, mode: str, ms: float | None) -> dict:
    """Achieved bandwidth (minimum traffic) and matrix FLOP rate, and their shares of the H100's limits."""
    if not ms:
        return {}
    bwd = mode != "fwd"
    gbs = min_bytes(shape, bwd) / (ms * 1e-3) / 1e9
    tfs = flops(shape, chunk, bwd) / (ms * 1e-3) / 1e12
    return dict(GB_s=round(gbs, 1), pct_bw=round(100 * gbs * 1e9 / H100_BW, 1), TFLOP_s=round(tfs, 2),
                pct_flops=round(100 * tfs * 1e12 / H100_BF16, 2))


def emit(**kw) -> None:
    print(MARK + json.dumps(kw), flush=True)


# --------------------------------------------------------------------------------------------- mamba children


class MambaTorch:
    """mamba_ssm's `mamba_chunk_scan_combined` (chunk 256) on the GPU through torch."""
    name = "mamba_ssm_triton[256]"
    chunk = 256

    def __init__(self):
        sys.path.insert(0, os.path.join(ROOT, ".anchors", "mamba"))
        import torch
        from triton.testing import do_bench
        # namespace packages mamba_ssm/ and mamba_ssm/ops/ (no __init__ copied): skips the CUDA-extension imports
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        self.torch, self.do_bench, self.fn = torch, do_bench, mamba_chunk_scan_combined
        self.data = {}

    def prepare(self, si, shape):
        torch = self.torch
        t = {k: torch.from_numpy(v).to("cuda") for k, v in inputs(shape).items()}
        bf = torch.bfloat16
        x, B, C, dy = (t[k].to(bf) for k in ("x", "B", "C", "dy"))
        leaves = [x, t["dt"], t["A"], B, C, t["D"], t["dt_bias"]]
        for v in leaves:
            v.requires_grad_(True)
        self.data[si] = (leaves, dy)

    def _fwd(self, si):
        (x, dt, A, B, C, D, bias), _ = self.data[si]
        with self.torch.no_grad():
            return self.fn(x, dt, A, B, C, self.chunk, D=D, dt_bias=bias, dt_softplus=True)

    def _fwdbwd(self, si):
        leaves, dy = self.data[si]
        x, dt, A, B, C, D, bias = leaves
        y = self.fn(x, dt, A, B, C, self.chunk, D=D, dt_bias=bias, dt_softplus=True)
        return self.torch.autograd.grad(y, leaves, dy)

    def warm(self, si):
        self._fwdbwd(si)  # autotunes the forward's and the backward's kernels
        self._fwd(si)
        self.torch.cuda.synchronize()

    def time(self, si, reps: int) -> dict:
        torch = self.torch
        out = {}
        for mode, fn, rep_ms in (("fwd", lambda: self._fwd(si), 100), ("fwd+bwd", lambda: self._fwdbwd(si), 200)):
            ms = self.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
            host = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                host.append((time.perf_counter() - t0) * 1e3)
            out[mode] = dict(median_ms=ms, timer="triton.testing.do_bench median (CUDA events)",
                             host_median_ms=statistics.median(host), reps=reps)
        return out

    def y_row0(self, si) -> np.ndarray:
        return self._fwd(si)[0].float().cpu().numpy()

    def release(self, si):
        self.data.pop(si, None)
        self.torch.cuda.empty_cache()


class MambaStandIn:
    """CPU stand-in (`--tiny`): the JAX chunked reference behind the same interface, so the child-process
    protocol (warm-up, deadline, go, results, agreement check) is exercised without torch or a GPU."""
    name = "mamba_stand_in[jax_chunked]"
    chunk = 16

    def __init__(self):
        import jax
        import jax.numpy as jnp
        from mamba_llama_jax.ops.ssd import ssd_chunked
        self.jax, self.jnp = jax, jnp
        self.f = jax.jit(lambda x, dt, A, B, C, D, bias: ssd_chunked(x, dt, A, B, C, D=D, dt_bias=bias,
                                                                       chunk_size=16)[0])
        self.data = {}

    def prepare(self, si, shape):
        ins = inputs(shape)
        self.data[si] = [self.jnp.asarray(ins[k]) for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")]

    def warm(self, si):
        if os.environ.get("BENCH_SCAN_SLOW_WARM"):  # lets the test of the deadline make a warm-up overrun
            time.sleep(float(os.environ["BENCH_SCAN_SLOW_WARM"]))
        self.jax.block_until_ready(self.f(*self.data[si]))

    def time(self, si, reps: int) -> dict:
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            self.jax.block_until_ready(self.f(*self.data[si]))
            ts.append((time.perf_counter() - t0) * 1e3)
        return {"fwd": dict(median_ms=statistics.median(ts), timer="host clock", host_median_ms=statistics.median(ts),
                            reps=reps)}

    def y_row0(self, si) -> np.ndarray:
        return np.asarray(self.f(*self.data[si])[0], np.float32)

    def release(self, si):
        self.data.pop(si, None)


def child_main(args) -> None:
    """A mamba child: warm its shapes up until the deadline, say "ready", wait for "go", time, say "done"."""
    shapes = TINY_SHAPES if args.tiny else SHAPES
    interrupted, warming = [], [True]

    def on_sigint(signum, frame):  # the parent's warm-up deadline: stop this autotune, keep what is warm
        if warming:  # a signal that crosses our "ready" on its way must not kill the timing phase
            interrupted.append(1)
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        impl = MambaStandIn() if args.mamba_stand_in else MambaTorch()
    except Exception as e:
        emit(event="unavailable", error=f"{type(e).__name__}: {str(e)[:300]}")
        return
    emit(event="started", impl=impl.name)
    warmed = []
    for si in map(int, args.child_shapes.split(",")):
        if time.time() > args.warm_deadline or interrupted:
            emit(event="warm_skipped", shape=si, reason="warm-up deadline passed before this shape")
            continue
        t0 = time.perf_counter()
        try:
            impl.prepare(si, shapes[si])
            impl.warm(si)
            warmed.append(si)
            emit(event="warm", shape=si, s=round(time.perf_counter() - t0, 2))
        except KeyboardInterrupt:
            impl.release(si)
            emit(event="warm_skipped", shape=si, reason=f"autotune/warm-up interrupted at its deadline after "
                                                         f"{time.perf_counter() - t0:.0f} s")
        except Exception as e:
            impl.release(si)
            emit(event="warm_error", shape=si, error=f"{type(e).__name__}: {str(e)[:300]}")
    warming.clear()
    emit(event="ready", warmed=warmed)
    if sys.stdin.readline().strip() != "go":
        return
    for si in warmed:
        try:
            res = impl.time(si, args.reps)
            path = os.path.join(args.workdir, f"mamba_y0_{si}.npy")
            np.save(path, impl.y_row0(si))
            emit(event="result", shape=si, impl=impl.name, chunk=impl.chunk, results=res, y0=path)
        except Exception as e:
            emit(event="result_error", shape=si, error=f"{type(e).__name__}: {str(e)[:300]}")
        impl.release(si)
    emit(event="done")


class Child:
    """The parent's handle on one mamba child: its protocol lines arrive through a queue fed by a thread."""

    def __init__(self, shapes: list[int], args, workdir: str, warm_deadline: float, log):
        self.shapes = shapes
        self.log = log
        self.stderr_path = os.path.join(workdir, f"child_{'_'.join(map(str, shapes))}.stderr")
        cmd = [sys.executable, os.path.abspath(__file__), "--mamba-child", "--child-shapes",
               ",".join(map(str, shapes)), "--warm-deadline", str(warm_deadline), "--workdir", workdir,
               "--reps", str(args.reps)]
        if args.tiny:
            cmd.append("--tiny")
        if args.mamba_stand_in:
            cmd.append("--mamba-stand-in")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.stderr_path, "w"), text=True, env=env, cwd=ROOT)
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.events: list[dict] = []
        self.state = "starting"
        self.warmed: list[int] = []

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.q.put(json.loads(line[len(MARK):]))
        self.q.put({"event": "eof"})

    def until(self, stop: set[str], deadline: float):
        """Yields events until one in `stop` (yielded too), end of output, or the deadline (then returns)."""
        while True:
            left = deadline - time.time()
            if left <= 0:
                return
            try:
                ev = self.q.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            self.events.append(ev)
            yield ev
            if ev["event"] in stop | {"eof", "unavailable"}:
                return

    def wait_ready(self, warm_deadline: float, grace: float) -> None:
        for ev in self.until({"ready"}, warm_deadline):
            self._note(ev)
            if ev["event"] in ("ready", "eof", "unavailable"):
                return
        if self.proc.poll() is None:  # still warming: interrupt the autotune, keep what is warm
            self.log(f"  mamba child {self.shapes}: warm-up deadline, interrupting")
            self.proc.send_signal(signal.SIGINT)
            for ev in self.until({"ready"}, time.time() + grace):
                self._note(ev)
        if self.state != "ready":
            self.kill("no 'ready' after the warm-up deadline")

    def _note(self, ev):
        kind = ev["event"]
        if kind == "ready":
            self.state = "ready"
            self.warmed = ev.get("warmed", [])
        elif kind in ("eof", "unavailable"):
            self.state = kind
        if kind != "result":
            self.log(f"  mamba child {self.shapes}: {json.dumps(ev)[:300]}")

    def run_timings(self, deadline: float) -> list[dict]:
        if self.state != "ready":
            return []
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except OSError:
            return []
        out = []
        done = False
        for ev in self.until({"done"}, deadline):
            self._note(ev)
            done |= ev["event"] == "done"
            if ev["event"] == "result":
                out.append(ev)
        try:
            self.proc.wait(timeout=10 if done else 0.1)
        except subprocess.TimeoutExpired:
            self.kill("timing not done by the deadline")
        return out

    def kill(self, why: str) -> None:
        if self.proc.poll() is None:
            self.log(f"  mamba child {self.shapes}: killed ({why})")
            self.proc.kill()
            self.proc.wait()
        self.state = f"killed: {why}"

    def stderr_tail(self) -> str:
        try:
            return open(self.stderr_path).read()[-1500:]
        except OSError:
            return ""


# ------------------------------------------------------------------------------------------------- JAX side


def pallas_variants(shape, tiny: bool, override: str | None) -> list[tuple[str, dict]]:
    """Kernel configurations per shape. n = 64: the dispatcher's default (chunk 64, whole head). n = 128 (state
    64x128): the default first (what users get), then the backward split in two head-dim blocks of 32 (halves
    its fp32 (P, n) state tiles in registers and shared memory), then chunk 32 with that split: the
    configuration compiled and verified on the H100 by tests/pallas (n128-chunk32). Each runs in its own try, so
    one that fails to compile (e.g. out of shared memory) is recorded and the others still give numbers."""
    if override:
        out = []
        for v in override.split(","):
            name, q, pb, pbb, *w = v.split(":")
            out.append((name, dict(chunk_size=int(q), block_p=int(pb), bwd_block_p=int(pbb),
                                   bwd_num_warps=int(w[0]) if w else None)))
        return out
    n = shape[4]
    if tiny:
        return [("c16", dict(chunk_size=16))] + ([("c16b16", dict(chunk_size=16, bwd_block_p=16))] if n > 16 else [])
    if n <= 64:
        return [("c64", dict(chunk_size=64))]
    return [("c64", dict(chunk_size=64)), ("c64b32", dict(chunk_size=64, bwd_block_p=32)),
            ("c32b32", dict(chunk_size=32, bwd_block_p=32))]


MGPU_NAME = "pallas_mgpu[c64]"  # fwd: Mosaic GPU kernel; fwd+bwd: that forward + the Triton backward


def on_hopper() -> bool:
    """Whether JAX runs on a GPU of compute capability 9.x (the Mosaic GPU kernel's wgmma needs one): the
    dispatcher's own test, so the column runs exactly where `dispatch.ssd` would take the kernel."""
    from pallas_kernels.dispatch import _on_hopper
    return _on_hopper()


def time_compiled(fn, args, reps: int, budget_s: float) -> dict:
    """Host clock around call + block_until_ready (median), then back-to-back calls (mean); the number of
    calls shrinks (to 3 at least) when `budget_s` would not cover `reps` of each."""
    import jax
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    ts = []
    t_start = time.perf_counter()
    while len(ts) < reps:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
        if len(ts) >= 3 and (time.perf_counter() - t_start) * 2 > budget_s:
            break
    n = len(ts)
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    pipelined = (time.perf_counter() - t0) * 1e3 / n
    return dict(median_ms=statistics.median(ts), min_ms=min(ts), pipelined_mean_ms=pipelined, reps=n)


def make_fn(fn, kw, mode):
    import jax
    import jax.numpy as jnp

    def f(x, dt, A, B, C, D, bias):
        return fn(x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=True, **kw)

    if mode == "fwd":
        return f

    def fb(x, dt, A, B, C, D, bias, dy):
        (y, fin), vjp = jax.vjp(f, x, dt, A, B, C, D, bias)
        return vjp((dy, jnp.zeros_like(fin)))
    return fb


def arg_specs(shape, mode):
    import jax
    import jax.numpy as jnp
    b, l, h, p, n, g = shape
    S, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    specs = [S((b, l, h, p), bf), S((b, l, h), f32), S((h,), f32), S((b, l, g, n), bf), S((b, l, g, n), bf),
             S((h,), f32), S((h,), f32)]
    return specs + ([S((b, l, h, p), bf)] if mode != "fwd" else [])


def device_args(ins):
    import jax.numpy as jnp
    bf = jnp.bfloat16
    x, B, C, dy = (jnp.asarray(ins[k]).astype(bf) for k in ("x", "B", "C", "dy"))
    dt, A, D, bias = (jnp.asarray(ins[k]) for k in ("dt", "A", "D", "dt_bias"))
    return (x, dt, A, B, C, D, bias), dy


class Run:
    """The budget, the log and the results of one benchmark run."""

    def __init__(self, budget_s: float):
        self.t0 = time.time()
        self.budget = budget_s
        self.lines: list[str] = []
        self.phases: dict[str, float] = {}

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def log(self, s: str) -> None:
        s = f"[{time.time() - self.t0:6.1f}s] {s}"
        print(s, flush=True)
        self.lines.append(s)

    def phase(self, name: str) -> None:
        self.phases[name] = round(time.time() - self.t0, 1)
        self.log(f"== {name}")


def parent_main(args) -> None:
    bench = Bench(args)
    bench.start_children()  # first: their warm-up (autotuning) is the long pole
    bench.compile_ahead()  # meanwhile: host inputs and the Pallas kernels, compiled with no GPU work
    bench.run.phase("waiting for the mamba children's warm-up")
    for ch in bench.children:  # nothing is timed while they autotune
        ch.wait_ready(bench.warm_deadline, grace=15.0)
    bench.time_jax()
    bench.time_mamba()
    bench.write()


class Bench:
    """One run: the budget and log, the implementations per shape, their results, the mamba children."""

    def __init__(self, args):
        self.args = args
        self.run = Run(args.budget)
        self.shapes = TINY_SHAPES if args.tiny else SHAPES
        self.sel = [int(s) for s in args.shapes.split(",")] if args.shapes else list(range(len(self.shapes)))
        self.skip = set(filter(None, args.skip.split(",")))
        self.workdir = tempfile.mkdtemp(prefix="bench_scan_")
        self.warm_deadline = self.run.t0 + max(10.0, args.budget - (25.0 if args.tiny else AFTER_WARM_S))
        self.children: list[Child] = []
        self.impls: dict[int, dict[str, dict]] = {si: {} for si in self.sel}
        self.results: dict[int, dict[str, dict]] = {si: {} for si in self.sel}
        self.y0: dict[int, tuple[str, np.ndarray]] = {}  # batch row 0 of the kernel's y, for the agreement check
        self.interp = dict(interpret=True) if args.tiny else {}
        self.mamba_meta: dict = {}

    def skipped(self, name: str) -> bool:  # "pallas" skips every pallas[...] variant, "jax_chunked" every chunk
        return any(name == s or name.startswith(s + "[") for s in self.skip)

    def start_children(self) -> None:
        if self.skipped("mamba_ssm_triton"):
            self.mamba_meta["skipped"] = "--skip mamba_ssm_triton"
            return
        by_n: dict[int, list[int]] = {}  # one child per state size: mamba's autotune keys include it
        for si in self.sel:
            by_n.setdefault(self.shapes[si][4], []).append(si)
        for group in by_n.values():
            self.children.append(Child(group, self.args, self.workdir, self.warm_deadline, self.run.log))

    def compile_ahead(self) -> None:
        import jax
        from mamba_llama_jax.ops.ssd import ssd_associative, ssd_chunked
        from pallas_kernels.ssd_chunk_scan import ssd_chunk_scan

        self.meta = dict(
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), jax=jax.__version__,
            backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
            python=platform.python_version(), budget_s=self.args.budget, tiny=self.args.tiny,
            dtypes="bf16 x/B/C/y, fp32 dt/A/D/dt_bias, fp32 states; g = h; dt_bias+softplus inside",
            limits=dict(bw_B_s=H100_BW, bf16_flop_s=H100_BF16, note="measured on this workplace's H100"))
        try:
            self.meta["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                              cwd=ROOT).stdout.strip()
        except Exception:
            pass
        self.run.log(json.dumps(self.meta))
        self.run.phase("inputs + Pallas compiles (children warming up)")
        self.host = {si: inputs(self.shapes[si]) for si in self.sel}
        hopper = on_hopper()
        self.meta["mosaic_gpu_column"] = (f"{MGPU_NAME}: Mosaic GPU forward (wgmma, TMA), backward = the Triton "
                                          "kernel's (custom_vjp)" if hopper else "not run: needs a GPU of "
                                          "compute capability 9.x")
        for si in self.sel:
            shape = self.shapes[si]
            variants = [(f"pallas[{v}]", ssd_chunk_scan, kw, {})
                        for v, kw in pallas_variants(shape, self.args.tiny, self.args.variants)]
            if hopper:  # the Mosaic GPU forward (wgmma): Hopper only; its fwd+bwd runs the Triton backward
                from pallas_kernels.ssd_chunk_scan_mgpu import ssd_chunk_scan_mgpu
                variants.append((MGPU_NAME, ssd_chunk_scan_mgpu, dict(chunk_size=64),
                                 dict(backward="triton ssd_chunk_scan (custom_vjp)")))
            for name, fn, kw, note in variants:
                if self.skipped(name):
                    continue
                kw = {**kw, **self.interp}
                entry = self.impls[si][name] = dict(fn=fn, kw=kw, chunk=kw["chunk_size"], modes={},
                                                    config={**{k: v for k, v in kw.items() if v is not None},
                                                            **note})
                for mode in ("fwd", "fwd+bwd"):
                    t0 = time.perf_counter()
                    try:
                        f = make_fn(fn, kw, mode)
                        jaxpr = str(jax.make_jaxpr(f)(*arg_specs(shape, mode)))
                        traced = "pallas_call" in jaxpr or "mpmd_map" in jaxpr  # Triton / Mosaic GPU kernel
                        comp = jax.jit(f).lower(*arg_specs(shape, mode)).compile()
                        entry["modes"][mode] = dict(compiled=comp, compile_s=round(time.perf_counter() - t0, 2),
                                                    traced_pallas_call=traced)
                    except Exception as e:  # e.g. out of shared memory: recorded, the other variants go on
                        entry["modes"][mode] = dict(error=f"compile: {type(e).__name__}: {str(e)[:400]}")
                        self.run.log(f"  shape {si} {name} {mode}: compile ERROR {type(e).__name__}: "
                                     f"{str(e)[:200]}")
                self.run.log(f"  shape {si} {name} compiled: " + ", ".join(
                    f"{m} {d.get('compile_s', 'ERR')} s" for m, d in entry["modes"].items()))
            rc = 16 if self.args.tiny else 256
            self.impls[si][f"jax_chunked[{rc}]"] = dict(fn=ssd_chunked, kw=dict(chunk_size=rc), chunk=rc,
                                                        config=dict(chunk_size=rc), modes={})
            if si < 2:  # the two short shapes only: it materialises every (b,l,h,p,n) state
                self.impls[si]["jax_associative"] = dict(fn=ssd_associative, kw={}, chunk=1, config={}, modes={})
            for name in list(self.impls[si]):
                if self.skipped(name):
                    del self.impls[si][name]

    def time_jax(self) -> None:
        """Every JAX implementation: the kernel at every shape first, then the references, each with its share
        of the budget that is left (a compile still to do is skipped when too little is)."""
        self.run.phase("timing JAX implementations")
        warm = any(c.warmed for c in self.children)
        reserve = 20.0 if warm else 3.0  # kept for the mamba timings
        order = [(si, nm) for kind in ("pallas", "jax_chunked", "jax_assoc") for si in self.sel
                 for nm in self.impls[si] if nm.startswith(kind)]
        dev = {}
        for k, (si, name) in enumerate(order):
            if si not in dev:
                dev[si] = device_args(self.host[si])
            for mode in ("fwd", "fwd+bwd"):
                self._time_one(si, name, mode, dev[si], reserve, per_left=max(1, 2 * (len(order) - k)))
        dev.clear()

    def _time_one(self, si, name, mode, dev_args, reserve, per_left) -> None:
        import jax
        import jax.numpy as jnp
        entry = self.impls[si][name]
        shape = self.shapes[si]
        key = f"{name} {mode}"
        rec = self.results[si][key] = dict(impl=name, function=f"{entry['fn'].__module__}.{entry['fn'].__name__}",
                                           config=entry["config"], chunk=entry["chunk"])
        b, l, h, p, n, g = shape
        if name == "jax_associative" and mode == "fwd+bwd" and l * h * n > 2048 * 24 * 64:
            rec["skipped"] = "materialises every state (b,l,h,p,n): too much memory at this shape"
            return
        left = self.run.left() - reserve
        est = 12.0 if mode not in entry["modes"] else 4.0  # compile still to do, or just timing
        if left < est:
            rec["skipped"] = f"budget: {left:.0f} s left, this needs about {est:.0f} s"
            self.run.log(f"  shape {si} {key}: skipped (budget)")
            return
        args_f, dy = dev_args
        try:
            m = entry["modes"].get(mode)
            if m is None:
                t0 = time.perf_counter()
                f = make_fn(entry["fn"], entry["kw"], mode)
                m = entry["modes"][mode] = dict(compiled=jax.jit(f).lower(*arg_specs(shape, mode)).compile(),
                                                compile_s=round(time.perf_counter() - t0, 2))
            if "error" in m:
                rec["error"] = m["error"]
                return
            call_args = args_f + ((dy,) if mode != "fwd" else ())
            per_impl = min(8.0, max(2.0, (left - est) / per_left))  # its share of what is left, 2 to 8 s
            r = time_compiled(m["compiled"], call_args, self.args.reps, per_impl)
            rec.update(r, compile_s=m["compile_s"], timing_budget_s=round(per_impl, 1))
            if "traced_pallas_call" in m:
                rec["traced_pallas_call"] = m["traced_pallas_call"]
            rec["rates_single_call"] = rates(shape, entry["chunk"], mode, r["median_ms"])
            rec["rates_back_to_back"] = rates(shape, entry["chunk"], mode, r["pipelined_mean_ms"])
            self.run.log(f"  shape {si} {key:28s} {r['median_ms']:8.3f} ms  (back-to-back "
                         f"{r['pipelined_mean_ms']:.3f}; {r['reps']} reps; "
                         f"{rec['rates_back_to_back'].get('pct_bw', 0)}% of BW)")
            if mode == "fwd" and name.startswith("pallas") and si not in self.y0:
                y = m["compiled"](*args_f)[0]
                self.y0[si] = (name, np.asarray(y[0].astype(jnp.float32), np.float64))
        except Exception as e:  # one failing implementation must not lose the others' numbers
            rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            self.run.log(f"  shape {si} {key}: ERROR {type(e).__name__}: {str(e)[:200]}")

    def time_mamba(self) -> None:
        """The children time their shapes one after the other (the parent idle)."""
        self.run.phase("timing mamba_ssm")
        mname = MambaStandIn.name if self.args.mamba_stand_in else MambaTorch.name
        for ch in self.children:
            got = ch.run_timings(deadline=time.time() + max(1.0, self.run.left() - 2.0))
            self.mamba_meta[",".join(map(str, ch.shapes))] = dict(
                state=ch.state, events=[e for e in ch.events if e["event"] != "result"],
                stderr_tail=ch.stderr_tail() if not got else "")
            for ev in got:
                self._mamba_result(ev)
            for si in ch.shapes:
                if not any(k.startswith(mname) for k in self.results[si]):
                    why = f"child {ch.state}; " + "; ".join(
                        f"{e['event']}: {e.get('reason', e.get('error', ''))}" for e in ch.events
                        if e.get("shape") == si or e["event"] == "unavailable")
                    for mode in ("fwd", "fwd+bwd"):
                        self.results[si][f"{mname} {mode}"] = dict(impl=mname, skipped=why[:300])

    def _mamba_result(self, ev) -> None:
        si = ev["shape"]
        for mode, r in ev["results"].items():
            rec = dict(impl=ev["impl"], function="mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined",
                       config=dict(chunk_size=ev["chunk"]), chunk=ev["chunk"], **r)
            rec["rates_single_call"] = rates(self.shapes[si], ev["chunk"], mode, r["median_ms"])
            self.results[si][f"{ev['impl']} {mode}"] = rec
            self.run.log(f"  shape {si} {ev['impl'] + ' ' + mode:28s} {r['median_ms']:8.3f} ms  "
                         f"(host clock {r['host_median_ms']:.3f})")
        if si in self.y0:
            ym = np.load(ev["y0"]).astype(np.float64)
            err = float(np.linalg.norm(self.y0[si][1] - ym) / np.linalg.norm(ym))
            self.results[si]["agreement"] = dict(rel_err_y_row0=err, pallas=self.y0[si][0], mamba=ev["impl"])
            self.run.log(f"  shape {si}: ‖y_pallas − y_mamba‖/‖y_mamba‖ (batch row 0) = {err:.2e}")

    def write(self) -> None:
        run, args = self.run, self.args
        run.phase("writing results")
        out = dict(meta=self.meta, phases=run.phases, total_s=round(time.time() - run.t0, 1),
                   mamba_children=self.mamba_meta,
                   results=[dict(shape=self.shapes[si], index=si, results=self.results[si],
                                 min_bytes_fwd=min_bytes(self.shapes[si], False),
                                 min_bytes_fwdbwd=min_bytes(self.shapes[si], True),
                                 floor_ms_fwd=floor_ms(self.shapes[si], False),
                                 floor_ms_fwdbwd=floor_ms(self.shapes[si], True)) for si in self.sel])
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "scan.json"), "w") as fh:
            json.dump(out, fh, indent=1, default=str)
        write_md(out, os.path.join(args.out, "scan.md"))
        run.log(f"total {out['total_s']} s (budget {args.budget} s); wrote {args.out}/scan.json and scan.md")
        print(open(os.path.join(args.out, "scan.md")).read())
        for ch in self.children:
            ch.kill("end of run")


def floor_ms(shape, bwd: bool) -> float:
    return max(min_bytes(shape, bwd) / H100_BW, flops(shape, 64, bwd) / H100_BF16) * 1e3


def _fmt(r: dict) -> str:
    if "median_ms" in r:
        s = f"{r['median_ms']:.3f}"
        if "pipelined_mean_ms" in r:
            s += f" ({r['pipelined_mean_ms']:.3f})"
        elif "host_median_ms" in r:
            s += f" [host {r['host_median_ms']:.3f}]"
        return s
    return ("skipped: " + r["skipped"][:60]) if "skipped" in r else ("ERROR " + r.get("error", "-")[:60])


def write_md(out: dict, path: str) -> None:
    meta = out["meta"]
    lines = ["# SSD scan benchmark", "",
             f"{meta['device']} ({meta['backend']}), jax {meta['jax']}, {meta['date']}, git {meta.get('git', '?')}; "
             f"whole run {out['total_s']} s (budget {meta['budget_s']} s); phases (s from start): {out['phases']}.",
             "",
             "ms: JAX = median of single calls, host clock around call + block_until_ready (back-to-back mean in "
             "brackets: dispatch hidden); mamba_ssm = do_bench median, CUDA events [host clock]. Rates from the "
             "back-to-back time (mamba: do_bench): minimum traffic / time vs 3.0 TB/s, matrix FLOPs at the "
             "implementation's chunk / time vs 790 TFLOP/s (both measured on this workplace's H100).", ""]
    for e in out["results"]:
        lines.append(f"## (b,l,h,p,n,g) = {tuple(e['shape'])}: floor fwd {e['floor_ms_fwd']:.3f} ms, "
                     f"fwd+bwd {e['floor_ms_fwdbwd']:.3f} ms")
        lines.append("")
        lines.append("| implementation | config | fwd ms | fwd+bwd ms | fwd GB/s (% BW) | fwd+bwd TFLOP/s (% bf16) |")
        lines.append("|---|---|---|---|---|---|")
        names = sorted({k.rsplit(" ", 1)[0] for k in e["results"] if k != "agreement"})
        for nm in names:
            f = e["results"].get(f"{nm} fwd", e["results"].get(nm, {}))
            fb = e["results"].get(f"{nm} fwd+bwd", {})
            cfg = json.dumps(f.get("config", fb.get("config", {})))
            rf = f.get("rates_back_to_back") or f.get("rates_single_call") or {}
            rb = fb.get("rates_back_to_back") or fb.get("rates_single_call") or {}
            bw = f"{rf['GB_s']:.0f} ({rf['pct_bw']}%)" if rf else "-"
            fl = f"{rb['TFLOP_s']:.1f} ({rb['pct_flops']}%)" if rb else "-"
            lines.append(f"| {nm} | `{cfg}` | {_fmt(f) if f else '-'} | {_fmt(fb) if fb else '-'} | {bw} | {fl} |")
        if "agreement" in e["results"]:
            a = e["results"]["agreement"]
            lines.append(f"\n‖y_pallas − y_mamba‖/‖y_mamba‖ (batch row 0, {a['pallas']}) = "
                         f"{a['rel_err_y_row0']:.2e}")
        lines.append("")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; --tiny: a temp dir)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--budget", type=float, default=225.0, help="wall seconds for the whole run")
    ap.add_argument("--shapes", default="", help="comma list of shape indices (default: all)")
    ap.add_argument("--variants", default=None,
                    help="override the per-shape Pallas configs: name:chunk:fwd_block_p:bwd_block_p[:bwd_warps],...")
    ap.add_argument("--skip", default="", help="comma list: pallas, pallas_mgpu, jax_chunked[256], "
                                               "jax_associative, mamba_ssm_triton")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, kernels interpreted")
    ap.add_argument("--mamba-stand-in", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mamba-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-shapes", default="", help=argparse.SUPPRESS)
    ap.add_argument("--warm-deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mamba_child:
        child_main(args)
        return
    if args.tiny:
        args.reps = min(args.reps, 3)
        args.mamba_stand_in = True
        args.budget = min(args.budget, 200.0)
    args.out = args.out or (os.path.join(tempfile.gettempdir(), "bench_scan_tiny") if args.tiny
                            else os.path.join(ROOT, "benchmarks", "results"))
    parent_main(args)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
