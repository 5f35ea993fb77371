"""Chunked SSD scan, side by side on one GPU: this project's Pallas kernel, the pure-JAX chunked SSD, the JAX
associative scan, and (if its source sits in .anchors/mamba/) mamba_ssm's Triton `mamba_chunk_scan_combined`.

Same inputs for all (bf16 x/B/C, fp32 dt, dt_bias + softplus inside, D, g = h), forward and forward+backward
(all gradients, cotangent given for y). Median of `--reps` timed runs after warm-up: JAX calls are timed with a
host clock around call + block_until_ready; torch with CUDA events through triton.testing.do_bench.

    PYTHONPATH=$PWD JAX_PLATFORMS=cuda python3 benchmarks/bench_scan.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mamba_llama_jax.ops.ssd import ssd_associative, ssd_chunked  # noqa: E402
from pallas_kernels.ssd_chunk_scan import ssd_chunk_scan  # noqa: E402

SHAPES = [(8, 2048, 9, 64, 64, 9), (8, 2048, 24, 64, 64, 24), (4, 8192, 24, 64, 64, 24), (2, 16384, 32, 64, 128, 32)]
# Issue 5's figures for mamba_ssm Triton on an H100 (ms, fwd / fwd+bwd), for comparison when torch is absent.
H100_BW = 3.0e12  # B/s, device-to-device copy measured on this workplace's H100 (KINDS.md)
H100_BF16 = 790e12  # FLOP/s, dense bf16 product measured there


def inputs(shape, seed=0):
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
    return fwd + b * l * h * p * 2 + b * l * h * p * 2 + 2 * b * l * g * n * 2 + b * l * h * 4  # + dy, dx, dB, dC, ddt


def flops(shape, chunk: int, bwd: bool) -> float:
    """Matrix-product FLOPs of the chunked algorithm (full chunk x chunk tiles, as the kernels compute them)."""
    b, l, h, p, n, g = shape
    per_pos = 2 * chunk * (n + p) + 2 * 2 * n * p
    f = b * l * h * per_pos
    return f * (3.5 if bwd else 1.0)  # bwd: the forward's products recomputed + ~2.5x more


def time_jax(fn, args, reps: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    # back-to-back calls hide the host dispatch cost that a one-call timing includes
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    pipelined = (time.perf_counter() - t0) * 1e3 / reps
    return dict(median_ms=statistics.median(ts), min_ms=min(ts), pipelined_mean_ms=pipelined, reps=reps)


def jax_impls(variants):
    impls = {}
    for name, kw in variants:
        impls[f"pallas[{name}]"] = (ssd_chunk_scan, kw)
    impls["jax_chunked[256]"] = (ssd_chunked, dict(chunk_size=256))
    impls["jax_associative"] = (ssd_associative, {})
    return impls


def bench_jax(shape, ins, impls, reps, skip_assoc_bwd, log):
    b, l, h, p, n, g = shape
    bf = jnp.bfloat16
    x, B, C = (jnp.asarray(ins[k]).astype(bf) for k in ("x", "B", "C"))
    dt, A, D, bias = (jnp.asarray(ins[k]) for k in ("dt", "A", "D", "dt_bias"))
    dy = jnp.asarray(ins["dy"]).astype(bf)
    res = {}
    for name, (fn, kw) in impls.items():
        for mode in ("fwd", "fwd+bwd"):
            key = f"{name} {mode}"
            if name == "jax_associative" and (skip_assoc_bwd or (mode == "fwd+bwd" and l * h * n > 2048 * 24 * 64)):
                res[key] = dict(skipped="materialises every state (b,l,h,p,n): too much memory at this shape")
                continue
            if mode == "fwd" and "bwdonly" in name:
                continue

            def f(x, dt, A, B, C, D, bias, fn=fn, kw=kw):
                return fn(x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=True, **kw)

            if mode == "fwd":
                run = jax.jit(f)
            else:
                def run_(x, dt, A, B, C, D, bias, dy, f=f):
                    (y, fin), vjp = jax.vjp(f, x, dt, A, B, C, D, bias)
                    return vjp((dy, jnp.zeros_like(fin)))
                run = jax.jit(run_)
            args = (x, dt, A, B, C, D, bias) + ((dy,) if mode != "fwd" else ())
            try:
                t0 = time.perf_counter()
                jax.block_until_ready(run(*args))
                comp = time.perf_counter() - t0
                r = time_jax(run, args, reps)
                r["first_call_s"] = comp
                res[key] = r
                log(f"  {key:40s} {r['median_ms']:8.3f} ms  (pipelined {r['pipelined_mean_ms']:.3f})")
            except Exception as e:  # keep going: one failing implementation must not lose the others' numbers
                res[key] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
                log(f"  {key:40s} ERROR {type(e).__name__}: {str(e)[:200]}")
    return res


def bench_mamba(shape, ins, reps, log):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".anchors", "mamba"))
    try:
        import torch
        from triton.testing import do_bench
        # namespace packages mamba_ssm/ and mamba_ssm/ops/ (no __init__ copied): skips the CUDA-extension imports
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:
        return {"mamba_ssm_triton": dict(skipped=f"not importable: {type(e).__name__}: {e}")}, None
    dev = "cuda"
    bf = torch.bfloat16
    t = {k: torch.from_numpy(v).to(dev) for k, v in ins.items()}
    x, B, C, dy = (t[k].to(bf) for k in ("x", "B", "C", "dy"))
    dt, A, D, bias = t["dt"], t["A"], t["D"], t["dt_bias"]
    leaves = [x, dt, A, B, C, D, bias]
    res = {}

    def fwd():
        return mamba_chunk_scan_combined(x, dt, A, B, C, 256, D=D, dt_bias=bias, dt_softplus=True)

    for v in leaves:
        v.requires_grad_(True)

    def fwdbwd():
        y = mamba_chunk_scan_combined(x, dt, A, B, C, 256, D=D, dt_bias=bias, dt_softplus=True)
        return torch.autograd.grad(y, leaves, dy)

    for mode, fn in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
        try:
            if mode == "fwd":
                with torch.no_grad():
                    ms = do_bench(fn, warmup=25, rep=max(50, reps * 3), return_mode="median")
            else:
                ms = do_bench(fn, warmup=25, rep=max(100, reps * 8), return_mode="median")
            res[f"mamba_ssm_triton[256] {mode}"] = dict(median_ms=ms, timer="triton.testing.do_bench (CUDA events)")
            log(f"  {'mamba_ssm_triton[256] ' + mode:40s} {ms:8.3f} ms")
        except Exception as e:
            res[f"mamba_ssm_triton[256] {mode}"] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
            log(f"  mamba {mode} ERROR {e}")
    # correctness of the comparison: mamba's y vs ours on the same inputs
    with torch.no_grad():
        y = mamba_chunk_scan_combined(x, dt, A, B, C, 256, D=D, dt_bias=bias, dt_softplus=True)
    y_np = y.float().cpu().numpy()
    del t, x, B, C, dy, leaves
    torch.cuda.empty_cache()
    return res, y_np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--shapes", default="0,1,2,3")
    # name:chunk:fwd head-dim block:bwd head-dim block[:bwd warps]
    ap.add_argument("--variants", default="c64:64:64:64,c64b32:64:64:32,c32b32:32:64:32")
    ap.add_argument("--skip", default="", help="comma list of implementations to leave out (jax_associative, ...)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: one tiny shape, kernels interpreted")
    args = ap.parse_args()
    if args.tiny:
        SHAPES[:] = [(1, 64, 2, 16, 16, 2)]
        args.shapes, args.reps = "0", 3
    os.makedirs(args.out, exist_ok=True)
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    variants = []
    for v in args.variants.split(","):
        name, q, pb, pbb, *w = v.split(":")
        variants.append((name, dict(chunk_size=min(int(q), 16) if args.tiny else int(q),
                                    block_p=16 if args.tiny else int(pb), bwd_block_p=16 if args.tiny else int(pbb),
                                    bwd_num_warps=int(w[0]) if w else None, interpret=args.tiny)))
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                jax=jax.__version__, backend=jax.default_backend(),
                device=str(jax.devices()[0].device_kind), python=platform.python_version(),
                dtypes="bf16 x/B/C/y, fp32 dt/A/D/dt_bias, fp32 states; g = h; dt_bias+softplus inside")
    try:
        import torch
        import triton
        meta.update(torch=torch.__version__, triton=triton.__version__)
    except Exception:
        pass
    try:
        import subprocess
        meta["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except Exception:
        pass
    log(json.dumps(meta))
    results = []
    for si in map(int, args.shapes.split(",")):
        shape = SHAPES[si]
        log(f"shape (b,l,h,p,n,g) = {shape}")
        ins = inputs(shape)
        mres, y_m = ({}, None) if "mamba_ssm_triton" in args.skip else bench_mamba(shape, ins, args.reps, log)
        impls = {k: v for k, v in jax_impls(variants).items() if k not in args.skip.split(",")}
        jres = bench_jax(shape, ins, impls, args.reps, skip_assoc_bwd=si >= 2, log=log)
        entry = dict(shape=shape, results={**jres, **mres})
        if y_m is not None:
            b, l, h, p, n, g = shape
            bf = jnp.bfloat16
            y, _ = jax.jit(lambda *a: ssd_chunk_scan(*a[:5], D=a[5], dt_bias=a[6], **variants[0][1]))(
                *(jnp.asarray(ins[k]).astype(bf) if k in "xBC" else jnp.asarray(ins[k])
                  for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")))
            yk = np.asarray(y.astype(jnp.float32), np.float64)
            entry["rel_err_pallas_vs_mamba_ssm_y"] = float(np.linalg.norm(yk - y_m) / np.linalg.norm(y_m))
            log(f"  ‖y_pallas − y_mamba‖/‖y_mamba‖ = {entry['rel_err_pallas_vs_mamba_ssm_y']:.2e}")
        entry["min_bytes_fwd"] = min_bytes(shape, False)
        entry["min_bytes_fwdbwd"] = min_bytes(shape, True)
        entry["floor_ms_fwd"] = max(min_bytes(shape, False) / H100_BW, flops(shape, 64, False) / H100_BF16) * 1e3
        entry["floor_ms_fwdbwd"] = max(min_bytes(shape, True) / H100_BW, flops(shape, 64, True) / H100_BF16) * 1e3
        results.append(entry)
        with open(os.path.join(args.out, "scan.json"), "w") as fh:
            json.dump(dict(meta=meta, results=results), fh, indent=1)
    write_md(meta, results, os.path.join(args.out, "scan.md"))
    log(open(os.path.join(args.out, "scan.md")).read())


def write_md(meta, results, path) -> None:
    out = [f"# SSD scan benchmark\n", f"{meta}\n",
           "ms, median; `pallas[cQ(pP)]` = chunk Q (head-dim block P); floor = max(min bytes / 3.0 TB/s, "
           "matrix FLOPs / 790 TFLOP/s)\n"]
    for e in results:
        out.append(f"\n## (b,l,h,p,n,g) = {tuple(e['shape'])}  floor fwd {e['floor_ms_fwd']:.3f} ms, "
                   f"fwd+bwd {e['floor_ms_fwdbwd']:.3f} ms\n")
        out.append("| implementation | fwd ms | fwd+bwd ms | fwd GB/s (min bytes) |\n|---|---|---|---|")
        names = sorted({k.rsplit(" ", 1)[0] for k in e["results"]})
        for nm in names:
            f = e["results"].get(f"{nm} fwd", {})
            fb = e["results"].get(f"{nm} fwd+bwd", {})
            fm = f.get("median_ms")
            bm = fb.get("median_ms")
            gbs = f"{e['min_bytes_fwd'] / (fm * 1e-3) / 1e9:.0f}" if fm else "-"
            out.append(f"| {nm} | {fm and round(fm, 3) or f.get('skipped', f.get('error', '-'))[:40]} | "
                       f"{bm and round(bm, 3) or fb.get('skipped', fb.get('error', '-'))[:40]} | {gbs} |")
    with open(path, "w") as fh:
        fh.write("\n".join(out) + "\n")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
