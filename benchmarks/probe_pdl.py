"""Does XLA launch this project's Pallas (Triton) kernels with Hopper's programmatic dependent launch, does it
put a `griddepcontrol.wait` at their entry, and does a kernel that triggers its dependents early
(`pallas_kernels.pdl`) let the next one start sooner? Measured, not read from XLA's source: the answer decides
whether a kernel may fetch its weights before it waits for the kernel before it.

Two Pallas kernels in a jitted loop, A then B, B reading A's output. A spins for `--spin-us` on the GPU's global
timer and writes when it started and ended; B writes the timer on entry, after an optional `griddepcontrol.wait`
of its own, and after reading A's output. Per variant (A triggers or not × B waits itself or not), medians over
the loop's iterations of B's entry − A's end and B's post-wait − A's end (ns):
- entry < 0 with A triggering: B was on the SMs before A ended, so XLA launched it with PDL and put no wait at
  its entry (a kernel may then prefetch before its own wait);
- entry > 0 always: B was not launched with PDL, or XLA waits at its entry; a smaller gap with the trigger says the
  trigger brings the next kernel on sooner.
Then the same pair without the spin, as a chain: host wall time per iteration of the loop, median of runs.

    python benchmarks/probe_pdl.py --out benchmarks/results          # device (Hopper)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

N = 16  # int32 words each kernel writes


def pair(trigger: bool, b_waits: bool, spin_ns: int) -> Any:
    """(x int32[N]) -> (A's words, B's words): A = [start, end, x[0] + 1, ...], B = [entry, after its wait, after
    reading A, A's word 2, ...]."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    from pallas_kernels import pdl
    from pallas_kernels.triton_call import compiler_params

    def words(*vals: Any) -> Any:
        idx = jax.lax.broadcasted_iota(jnp.int32, (N,), 0)
        out = jnp.zeros((N,), jnp.int32)
        for i, v in enumerate(vals):
            out = jnp.where(idx == i, v, out)
        return out

    def kernel_a(x_ref: Any, o_ref: Any) -> None:
        if trigger:
            pdl.launch_dependents()
        t0 = pdl.globaltimer_lo()
        jax.lax.while_loop(lambda t: (t - t0) < spin_ns, lambda t: pdl.globaltimer_lo(), t0)
        x0 = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, (N,), 0) == 0, x_ref[...], 0))
        t1 = pdl.globaltimer_lo()
        o_ref[...] = words(t0, t1, x0 + 1)

    def kernel_b(a_ref: Any, o_ref: Any) -> None:
        te = pdl.globaltimer_lo()
        if b_waits:
            pdl.wait()
        tw = pdl.globaltimer_lo()
        a = a_ref[...]
        tr = pdl.globaltimer_lo()
        a2 = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, (N,), 0) == 2, a, 0))
        o_ref[...] = words(te, tw, tr, a2)

    shape = jax.ShapeDtypeStruct((N,), jnp.int32)
    call_a = pl.pallas_call(kernel_a, out_shape=shape, grid=(1,), compiler_params=compiler_params(4, 1),
                            name="probe_a")
    call_b = pl.pallas_call(kernel_b, out_shape=shape, grid=(1,), compiler_params=compiler_params(4, 1),
                            name="probe_b")

    def step(x: Any) -> tuple[Any, Any]:
        a = call_a(x)
        return a, call_b(a)

    return step


def looped(step: Any, iters: int) -> Any:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def run(x: Any) -> Any:
        def body(i: Any, carry: Any) -> Any:
            x, rec = carry
            a, b = step(x)
            return b, rec.at[i].set(jnp.concatenate([a, b]))

        return jax.lax.fori_loop(0, iters, body, (x, jnp.zeros((iters, 2 * N), jnp.int32)))

    return run


def signed_ns(d: Any) -> Any:
    import numpy as np

    d = np.asarray(d, np.int64) % (1 << 32)
    return np.where(d >= (1 << 31), d - (1 << 32), d)


def probe(trigger: bool, b_waits: bool, spin_us: float, iters: int, chain_iters: int, runs: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.zeros((N,), jnp.int32)
    run = looped(pair(trigger, b_waits, int(spin_us * 1000)), iters)
    jax.block_until_ready(run(x))
    _, rec = jax.block_until_ready(run(x))
    rec = np.asarray(rec)[iters // 10:]
    a_start, a_end, b_entry, b_wait, b_read = rec[:, 0], rec[:, 1], rec[:, N], rec[:, N + 1], rec[:, N + 2]
    ok = bool(np.all(rec[1:, N + 3] == rec[1:, 2]))  # B read the value A wrote this iteration
    out = {"trigger": trigger, "b_waits": b_waits, "a_ns": float(np.median(signed_ns(a_end - a_start))),
           "entry_minus_a_end_ns": float(np.median(signed_ns(b_entry - a_end))),
           "entry_minus_a_start_ns": float(np.median(signed_ns(b_entry - a_start))),
           "wait_minus_a_end_ns": float(np.median(signed_ns(b_wait - a_end))),
           "read_minus_a_end_ns": float(np.median(signed_ns(b_read - a_end))),
           "entry_before_a_end_share": float(np.mean(signed_ns(b_entry - a_end) < 0)), "b_read_a": ok}
    chain = looped(pair(trigger, b_waits, 0), chain_iters)
    jax.block_until_ready(chain(x))
    walls = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(chain(x))
        walls.append(time.perf_counter() - t)
    out["chain_us_per_iter"] = 1e6 * statistics.median(walls) / chain_iters
    return out


def render_md(r: dict[str, Any]) -> str:
    m = r["meta"]
    lines = [f"# PDL probe ({m['device']}, {m['date']})", "",
             f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}. Command: `{m['command']}`.", "",
             "Kernel A spins on the global timer, kernel B reads A's output (module docstring of"
             " benchmarks/probe_pdl.py). Medians over the loop's iterations, ns; chain = the pair without the spin,"
             " host µs per loop iteration.", "",
             "| A triggers | B waits itself | A ns | B entry − A end | B entry − A start | B after wait − A end "
             "| B after read − A end | entries before A's end | B read A's value | chain µs/iter |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in r["rows"]:
        if "error" in v:
            lines.append(f"| {v['trigger']} | {v['b_waits']} | {v['error']} | | | | | | | |")
            continue
        lines.append(f"| {v['trigger']} | {v['b_waits']} | {v['a_ns']:.0f} | {v['entry_minus_a_end_ns']:.0f} | "
                     f"{v['entry_minus_a_start_ns']:.0f} | {v['wait_minus_a_end_ns']:.0f} | "
                     f"{v['read_minus_a_end_ns']:.0f} | {v['entry_before_a_end_share']:.2f} | {v['b_read_a']} | "
                     f"{v['chain_us_per_iter']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spin-us", type=float, default=20.0)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--chain-iters", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--stem", default="probe_pdl")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args(argv)
    import jax

    from bench_env import device, now, versions
    from pallas_kernels import pdl

    if jax.default_backend() != "gpu" or not pdl.available():
        raise SystemExit("probe_pdl: needs a GPU of compute capability >= 9.0 and pallas_kernels.pdl available")
    r: dict[str, Any] = {"meta": {"date": now(), "device": device(), "versions": versions(),
                                  "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:])},
                         "rows": []}
    for trigger in (False, True):
        for b_waits in (False, True):
            try:
                row = probe(trigger, b_waits, a.spin_us, a.iters, a.chain_iters, a.runs)
            except Exception as e:  # noqa: BLE001 - a variant the compiler rejects is a finding, not a crash
                row = {"trigger": trigger, "b_waits": b_waits, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            r["rows"].append(row)
            print(row, flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.stem}.json").write_text(json.dumps(r, indent=1))
    (a.out / f"{a.stem}.md").write_text(render_md(r))
    print(render_md(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
