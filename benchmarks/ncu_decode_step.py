"""Hardware counters of one decode step's kernels (issue 3): Nsight Compute (`ncu`) on a few consecutive kernels
of the teacher's jitted decode loop (random weights of the SmolLM2-135M shape, bf16), per kernel: duration, DRAM
bytes and bandwidth, throughput as a share of the peaks, occupancy, registers, and where its warps stall.

Why: the step's profile (bench_decode_profile.py) says how long each kernel takes, not why. At batch 64 the decode
attention kernel takes ~10.8 µs a layer for ~9 MB of K/V (~0.9 TB/s) and XLA's GEMMs ~3 µs for 0.7-1.8 MB of
weights; whether they wait on memory latency, on too few programs or on their own arithmetic decides what to
change.

    python benchmarks/ncu_decode_step.py --batch 64 --out benchmarks/results     # device (ncu on the PATH)
    python benchmarks/ncu_decode_step.py --what attention --batch 64 --out benchmarks/results  # the kernel alone

`--what loop` (the default): a prompt of `--context` tokens and a decode loop of `--steps` steps, run inside a
cuProfilerStart/Stop range (ncu's `--profile-from-start off`), of which ncu skips the first `--skip` kernels and
records the next `--kernels` (slow: see `worker`). `--what attention`: the decode attention kernel alone, `--steps`
calls recorded. ncu replays each kernel once per counter pass with the caches flushed and the clocks left alone
(`--clock-control none`), so durations are of a kernel run alone, its data coming from DRAM, without the
neighbours it overlaps in the loop.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats")
# (section, metric name as ncu's details page writes it) -> the column it becomes here
DETAILS = {
    ("GPU Speed Of Light Throughput", "Duration"): "duration",
    ("GPU Speed Of Light Throughput", "DRAM Throughput"): "dram_pct",
    ("GPU Speed Of Light Throughput", "Memory Throughput"): "mem_pct",
    ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"): "sm_pct",
    ("Occupancy", "Theoretical Occupancy"): "theo_occ_pct",
    ("Occupancy", "Achieved Occupancy"): "ach_occ_pct",
    ("Launch Statistics", "Registers Per Thread"): "regs",
    ("Launch Statistics", "Waves Per SM"): "waves",
    ("Launch Statistics", "Dynamic Shared Memory Per Block"): "dyn_smem",
    ("Warp State Statistics", "Warp Cycles Per Issued Instruction"): "cycles_per_issue",
    ("Scheduler Statistics", "No Eligible"): "no_eligible_pct",
}
_TIME_UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
_BYTE_UNITS = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}
_STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")


def _num(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def parse_details(text: str) -> dict[str, dict[str, Any]]:
    """ncu's `--page details --csv` → {kernel ID: {"name", "grid", "block", and the DETAILS columns}}; durations
    in µs, shared memory in bytes, percentages as written."""
    out: dict[str, dict[str, Any]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        kid = row.get("ID")
        if kid is None:
            continue
        k = out.setdefault(kid, {"name": row.get("Kernel Name", ""), "grid": row.get("Grid Size", ""),
                                 "block": row.get("Block Size", "")})
        col = DETAILS.get((row.get("Section Name", ""), row.get("Metric Name", "")))
        v = _num(row.get("Metric Value", ""))
        if col is None or v is None:
            continue
        unit = row.get("Metric Unit", "")
        if col == "duration":
            v *= _TIME_UNITS.get(unit, 1.0)
        elif col == "dyn_smem":
            v *= _BYTE_UNITS.get(unit.split("/")[0], 1)
        k[col] = v
    return out


def parse_raw(text: str) -> list[dict[str, Any]]:
    """ncu's `--page raw --csv` (a header of metric names, a row of units, a row a kernel) → per kernel in order:
    {"id", "dram_bytes", "stalls": {reason: warps stalled per issued instruction}}."""
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 3:
        return []
    head, units = rows[0], rows[1]
    out = []
    for r in rows[2:]:
        rec: dict[str, Any] = {"id": None, "dram_bytes": 0.0, "stalls": {}}
        for name, unit, val in zip(head, units, r):
            if name == "ID":
                rec["id"] = val
            elif name in ("dram__bytes_read.sum", "dram__bytes_write.sum"):
                v = _num(val)
                rec["dram_bytes"] += (v or 0.0) * _BYTE_UNITS.get(unit, 1)
            elif m := _STALL.match(name):
                v = _num(val)
                if v:
                    rec["stalls"][m.group(1)] = v
        out.append(rec)
    return out


def merge(details: dict[str, dict[str, Any]], raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record a kernel, in launch order: the details columns, DRAM bytes, the achieved bandwidth (GB/s) and the
    three largest stall reasons."""
    by_id = {r["id"]: r for r in raw}
    out = []
    for kid in sorted(details, key=lambda s: int(s) if s.isdigit() else s):
        k = dict(details[kid], id=kid)
        r = by_id.get(kid, {"dram_bytes": 0.0, "stalls": {}})
        k["dram_bytes"] = r["dram_bytes"]
        if k.get("duration"):
            k["dram_gbs"] = r["dram_bytes"] / (k["duration"] * 1e-6) / 1e9
        k["top_stalls"] = dict(sorted(r["stalls"].items(), key=lambda kv: -kv[1])[:3])
        out.append(k)
    return out


def render_md(r: dict[str, Any]) -> str:
    m = r["meta"]

    def f(k: dict[str, Any], key: str, fmt: str) -> str:
        return format(k[key], fmt) if key in k else "-"

    lines = [f"# Decode-step kernels under Nsight Compute ({m['device']}, {m['date']})", "",
             f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}, {m.get('ncu', 'ncu ?')}. "
             f"Command: `{m['command']}`.",
             (f"Teacher shape, random bf16 weights, batch {m['batch']}, prompt {m['context']} tokens; kernels "
              f"{m['skip'] + 1}-{m['skip'] + m['kernels']} of the decode loop's profiled range"
              if m.get("what", "loop") == "loop" else
              f"The decode attention kernel alone (`--what attention`: {m.get('ran', '?')}), teacher heads, batch "
              f"{m['batch']}, the new token at slot {m['context']}; {m['kernels']} calls") + ", each replayed alone "
             "by ncu (`--clock-control none`). DRAM GB/s = (dram bytes read + written) / duration; stalls = warps "
             "stalled per issued instruction, the three largest reasons.", "",
             "| # | kernel | grid | block | regs | µs | DRAM MB | DRAM GB/s | DRAM % | SM % | waves | occupancy "
             "theor. / achieved % | cycles / issue | no eligible % | stalls |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, k in enumerate(r["kernels"]):
        stalls = ", ".join(f"{n} {v:.1f}" for n, v in k["top_stalls"].items())
        lines.append(f"| {i} | `{k['name'][:48]}` | {k['grid']} | {k['block']} | {f(k, 'regs', '.0f')} | "
                     f"{f(k, 'duration', '.2f')} | {k['dram_bytes'] / 1e6:.2f} | {f(k, 'dram_gbs', ',.0f')} | "
                     f"{f(k, 'dram_pct', '.1f')} | {f(k, 'sm_pct', '.1f')} | {f(k, 'waves', '.2f')} | "
                     f"{f(k, 'theo_occ_pct', '.0f')} / {f(k, 'ach_occ_pct', '.1f')} | "
                     f"{f(k, 'cycles_per_issue', '.1f')} | {f(k, 'no_eligible_pct', '.1f')} | {stalls} |")
    return "\n".join(lines) + "\n"


def find_ncu() -> str | None:
    """The ncu executable: on the PATH, else where Nsight Compute or CUDA install it; None if absent."""
    return shutil.which("ncu") or next(iter(sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
                                            + sorted(glob.glob("/usr/local/cuda*/bin/ncu"))), None)


def _profiler(on: bool) -> None:
    """cuProfilerStart / Stop on the primary context of GPU 0 (the one XLA uses): ncu records only in between."""
    import ctypes

    cu = ctypes.CDLL("libcuda.so.1")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    for rc in (cu.cuDeviceGet(ctypes.byref(dev), 0), cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev),
               cu.cuCtxSetCurrent(ctx), cu.cuProfilerStart() if on else cu.cuProfilerStop()):
        if rc:
            raise RuntimeError(f"ncu_decode_step: CUDA driver call failed ({rc})")


def worker(what: str, batch: int, context: int, steps: int, tiny: bool) -> None:
    """`loop`: compiles the teacher's prefill and decode loop, runs them twice (compilation, autotuning, warm-up),
    then once more with the decode loop alone inside the profiler range. `attention`: the decode attention kernel
    alone at the teacher's heads (`bench_decode_attention.make_step`: `plan`'s tiling over a cache of
    `context + steps` slots rounded up to whole 128-slot blocks, the new token at slot `context`, the q·k·v row
    given whole rather than as split-K partials), `steps` calls inside the range after three outside. No range
    without a GPU (the CPU smoke test).

    XLA's command buffers are off (the loop's kernels launched one by one, the same kernels) and its compilation
    runs on one thread. Under ncu 2025.3.1 (H100, jax 0.11.2) the loop's worker ended in a segmentation fault in two
    of five tries (once with XLA's defaults, once with command buffers off, 15-40 s after start, before its
    compilation was done), ran past 200 s twice, and with both settings compiled in 59 s and profiled, ~40 s a
    kernel. The cause is not established; these settings are what ran. The slowness: ncu backs up the device
    memory a kernel may write in host memory for every replay pass, and JAX preallocates 75 % of the GPU's, so the
    worker turns preallocation off (allocating what it uses; not yet tried under ncu)."""
    flags = " --xla_gpu_enable_command_buffer= --xla_gpu_force_compilation_parallelism=1"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + flags).strip()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    import numpy as np

    gpu = jax.default_backend() == "gpu"
    t0 = time.perf_counter()
    if what == "attention":
        from bench_decode_attention import HEAD_DIM, HEADS, KV, TINY, make_step
        from pallas_kernels.decode_attention import plan, planned_stages, planned_warps

        heads, kv, d = (TINY["heads"], TINY["kv"], TINY["head_dim"]) if tiny else (HEADS, KV, HEAD_DIM)
        slots = -(-(context + steps) // 128) * 128  # the decode loop's window, whole 128-slot blocks
        block, splits = plan(batch, kv, slots)
        warps = planned_warps(0, block)
        run = make_step(batch, slots, context, block, splits, warps, heads, kv, d, interpret=not gpu)
        for _ in range(3):
            jax.block_until_ready(run())

        def call() -> None:
            for _ in range(steps):
                jax.block_until_ready(run())

        desc = (f"decode attention {block}-slot blocks, {splits} split(s), {warps} warps, "
                f"{planned_stages(batch)} stages, over {slots} slots")
    else:
        from bench_generate import _jax_model, compile_generate
        from mamba_llama_jax.inference.generate import Generator

        gen = Generator(_jax_model(None, tiny))
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, gen.cfg.vocab_size, (batch, context)), jnp.int32)
        c = compile_generate(gen, tokens, steps + 1)
        c.once()
        c.once()
        first, cache = c.prefill()

        def call() -> None:
            c.decode(first, cache)

        desc = "decode loop"
    print(f"ncu_decode_step worker: compiled and warmed up in {time.perf_counter() - t0:.0f} s", flush=True)
    if gpu:
        _profiler(True)
    call()
    if gpu:
        _profiler(False)
    print(f"ncu_decode_step worker: {desc}; batch {batch}, context {context}, {steps} steps profiled", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", choices=("loop", "attention"), default="loop",
                    help="the whole decode loop, or the decode attention kernel alone")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=192, help="prompt tokens (the K/V slots each step reads)")
    ap.add_argument("--steps", type=int, default=3, help="decode steps inside the profiled range")
    ap.add_argument("--skip", type=int, default=30, help="kernels of the range skipped before recording")
    ap.add_argument("--kernels", type=int, default=24, help="kernels recorded")
    ap.add_argument("--stem", default="", help="result file name (default ncu_decode_b{batch} / "
                    "ncu_attention_b{batch})")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--timeout-s", type=float, default=500)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="worker only: a tiny model (CPU smoke test)")
    a = ap.parse_args(argv)
    if a.batch < 1 or a.context < 1 or a.steps < 1 or a.kernels < 1 or a.skip < 0:
        ap.error("--batch, --context, --steps and --kernels must be >= 1, --skip >= 0")
    if a.worker:
        worker(a.what, a.batch, a.context, a.steps, a.tiny)
        return 0
    ncu = find_ncu()
    if ncu is None:
        print("error: ncu (Nsight Compute) not found on the PATH or under /opt/nvidia/nsight-compute",
              file=sys.stderr)
        return 2
    from bench_env import device, now, versions

    stem = a.stem or f"ncu_{'decode' if a.what == 'loop' else 'attention'}_b{a.batch}"
    a.out.mkdir(parents=True, exist_ok=True)
    # the report is written aside and moved in only once ncu succeeded: a failed run leaves an earlier one alone
    rep = Path(tempfile.mkdtemp(prefix="ncu_decode_step_")) / f"{stem}.ncu-rep"
    skip, count = (a.skip, a.kernels) if a.what == "loop" else (0, a.steps)
    cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--launch-skip", str(skip),
           "--launch-count", str(count), "-f", "-o", str(rep.with_suffix(""))]
    if a.what == "attention":
        cmd += ["--kernel-name", "regex:decode_attention"]
    for s in SECTIONS:
        cmd += ["--section", s]
    cmd += ["--metrics", "dram__bytes_read.sum,dram__bytes_write.sum,"
            r"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"]
    cmd += [sys.executable, str(Path(__file__).resolve()), "--worker", "--what", a.what, "--batch", str(a.batch),
            "--context", str(a.context), "--steps", str(a.steps)]
    t0 = time.perf_counter()
    log = a.out / f"{stem}.log"
    with log.open("w") as f:  # streamed: a run cut short still shows how far it got
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=a.timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "killed at --timeout-s"
    if rc or not rep.exists():
        shutil.rmtree(rep.parent, ignore_errors=True)
        print(f"error: ncu exited {rc}; its output is in {log}", file=sys.stderr)
        return 1

    def page(name: str) -> str:
        return subprocess.run([ncu, "-i", str(rep), "--csv", "--page", name], capture_output=True, text=True,
                              check=True).stdout

    kernels = merge(parse_details(page("details")), parse_raw(page("raw")))
    # what the worker ran (for the kernel alone: its tiling), as it said in the log
    said = re.search(r"ncu_decode_step worker: (.*?); batch", log.read_text())
    text = subprocess.run([ncu, "-i", str(rep), "--page", "details", "--print-details", "all"],
                          capture_output=True, text=True).stdout
    (a.out / f"{stem}_details.txt").write_text(text)
    ver = subprocess.run([ncu, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    r = {"meta": {"date": now(), "device": device(), "versions": versions(), "ncu": ver[-1] if ver else "ncu ?",
                  "command": "python " + " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
                  "what": a.what, "ran": said.group(1) if said else "?",
                  "batch": a.batch, "context": a.context, "skip": skip, "kernels": len(kernels),
                  "seconds": time.perf_counter() - t0},
         "kernels": kernels}
    (a.out / f"{stem}.json").write_text(json.dumps(r, indent=1))
    (a.out / f"{stem}.md").write_text(render_md(r))
    shutil.move(str(rep), str(a.out / rep.name))
    shutil.rmtree(rep.parent, ignore_errors=True)
    print(render_md(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
