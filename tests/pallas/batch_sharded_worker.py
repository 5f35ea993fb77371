"""Subprocess worker for `test_batch_sharded.py` (needs 8 fake CPU devices, set before jax is imported): runs the
kernels (Pallas interpret mode) and a reference through `dispatch.batch_sharded` under a context mesh, and the same
calls without one, and prints a JSON report: the largest relative differences of outputs and gradients, the
collectives in the compiled sharded functions, and whether a shard_map was traced."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["MAMBA_LLAMA_INTERPRET_KERNELS"] = "1"  # dispatch.verify / selective_scan take the kernels on a CPU
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "train"))

import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from kernel_helpers import make_ssd_inputs, rel, weighted_sum  # noqa: E402

from mamba_llama_jax.ops.ssd import ssd_chunked  # noqa: E402
from mamba_llama_jax.train import mesh as mesh_lib  # noqa: E402
from pallas_kernels import dispatch  # noqa: E402
from pallas_kernels.ssd_chunk_scan import ssd_chunk_scan  # noqa: E402

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(compiled_text: str) -> list[str]:
    return sorted({op for op in COLLECTIVES if re.search(rf"\b{op}(-start)?\(", compiled_text)})


def _batch_ways(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in mesh_lib.BATCH_AXES]))


def compare(fn, batched: dict, shared: dict, mesh, *, grad: bool) -> dict:
    """fn(batched, shared) -> (y, state) traced with and without `mesh` in context: max relative differences of
    the outputs (and of every gradient of `weighted_sum`), the sharded compile's collectives, shard_map traced."""
    def scalar(b, s):
        return weighted_sum(*fn(b, s))

    run = (lambda b, s: (fn(b, s), jax.grad(scalar, argnums=(0, 1), allow_int=True)(b, s))) if grad else fn
    plain = jax.jit(run)(batched, shared)

    def in_context(b, s):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return run(b, s)

    rows = jax.tree.leaves(batched)[0].shape[0]
    split = mesh_lib.batch_sharding(mesh) if rows % _batch_ways(mesh) == 0 else mesh_lib.replicated(mesh)
    b_put = jax.device_put(batched, jax.tree.map(lambda _: split, batched))
    s_put = jax.device_put(shared, mesh_lib.replicated(mesh))
    sharded = jax.jit(in_context)
    got = sharded(b_put, s_put)
    diffs = [rel(a, r) for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(plain))
             if a.dtype != jax.dtypes.float0]  # the segment ids' (integer) gradient
    return {"max_rel": max(diffs), "n_compared": len(diffs),
            "collectives": collectives(sharded.lower(b_put, s_put).compile().as_text()),
            "shard_map": "shard_map" in str(jax.make_jaxpr(in_context)(b_put, s_put))}


def ssd_cases(mesh) -> dict:
    ins, segs = make_ssd_inputs(8, 32, 4, 16, 16, 2, seg=True)
    batched = {k: ins[k] for k in ("x", "dt", "B", "C", "initial_state")} | {"segment_ids": segs}
    shared = {k: ins[k] for k in ("A", "D", "dt_bias")}
    kernel = functools.partial(ssd_chunk_scan, chunk_size=16, interpret=True)
    out = {}
    for name, fn in (("ssd_kernel", kernel), ("ssd_reference", functools.partial(ssd_chunked, chunk_size=16))):
        out[name] = compare(lambda b, s, fn=fn: dispatch.batch_sharded(fn, b, s), batched, shared, mesh, grad=True)
    # 6 rows on a mesh that splits the batch 4 ways: the plain call, left to GSPMD
    odd = {k: v[:6] for k, v in batched.items()}
    out["ssd_uneven_batch"] = compare(lambda b, s: dispatch.batch_sharded(kernel, b, s), odd, shared, mesh,
                                      grad=False)
    return out


def dispatcher_cases(mesh) -> dict:
    """The dispatch entry points themselves (interpret kernels chosen by MAMBA_LLAMA_INTERPRET_KERNELS)."""
    r = np.random.default_rng(0)
    f = lambda *shape: jnp.asarray(r.standard_normal(shape).astype(np.float32))
    b, l, h, p, n, d = 8, 16, 2, 16, 16, 32
    out = {}
    vb = dict(state=f(b, h, p, n), x=f(b, 4, h, p), dt=f(b, 4, h), B=f(b, 4, h, n), C=f(b, 4, h, n),
              accepted=jnp.asarray(r.integers(0, 5, b), jnp.int32))
    vs = dict(A=-jnp.exp(f(h)), D=f(h), dt_bias=f(h))

    def verify(bt, s):
        return dispatch.verify(bt["state"], bt["x"], bt["dt"], s["A"], bt["B"], bt["C"], D=s["D"],
                               dt_bias=s["dt_bias"], accepted=bt["accepted"])
    out["verify"] = compare(verify, vb, vs, mesh, grad=False)
    out["verify_choice"] = dispatch.last_choice("verify")
    sb = dict(u=f(b, l, d), delta=f(b, l, d) - 1.0, B=f(b, l, 2, 4), C=f(b, l, 2, 4), z=f(b, l, d),
              initial_state=f(b, d, 4))
    ss = dict(A=-jnp.exp(f(d, 4)), D=f(d), delta_bias=f(d))

    def scan(bt, s):
        return dispatch.selective_scan(bt["u"], bt["delta"], s["A"], bt["B"], bt["C"], D=s["D"], z=bt["z"],
                                       delta_bias=s["delta_bias"], initial_state=bt["initial_state"])
    # forward only: interpret mode unrolls the scan, so its gradient compiles for long; the gradient through
    # shard_map is the chunked SSD's check above
    out["selective_scan"] = compare(scan, sb, ss, mesh, grad=False)
    out["selective_scan_choice"] = dispatch.last_choice("selective_scan")
    return out


def trainer_case() -> dict:
    """The trainer's step makes its mesh the context while tracing: a Mamba1 hybrid whose scan goes through the
    dispatcher (interpret kernel) runs it per batch shard on a data-parallel mesh, where parameters are
    replicated, so the compiled step needs no all-gather; the loss equals the single-device step's."""
    import tiny

    from mamba_llama_jax.config import HybridConfig, MambaConfig
    from mamba_llama_jax.data import pipeline
    from mamba_llama_jax.train import trainer

    hyb = HybridConfig(attn_fraction=0.5, mamba=MambaConfig(variant="mamba1", d_state=4, scan="kernel"))

    def run(shape, devices):
        t = tiny.teacher()
        st = tiny.stage(steps=1, batch_size=8, train="mamba")
        step = trainer.build_step(st, tiny.hybrid(t, hyb=hyb), t, mesh_lib.make_mesh(shape, devices))
        tr, fr = step.student.trainable, step.student.frozen
        tp = {**step.teacher.trainable, **step.teacher.frozen}
        batch = mesh_lib.global_batch(next(iter(pipeline.build_dataset(
            tiny.token_examples(), tiny.PadTok(), st.data, batch_size=8))), step.mesh)
        args = (tr, trainer.init_opt_state(step), jax.random.key_data(jax.random.key(0)), fr, tp, batch)
        compiled = step.fn.lower(*args).compile()
        return float(compiled(*args)[3]["loss"]), compiled.as_text()

    loss1, _ = run((1, 1, 1), jax.devices()[:1])
    loss8, text = run((8, 1, 1), None)
    return {"loss_diff": abs(loss8 - loss1), "collectives": collectives(text),
            "choice": dispatch.last_choice("selective_scan")}


def main():
    """`ops`: the kernels and the dispatcher on a (2, 2, 2) mesh (both batch axes, and a tensor axis the operands
    stay replicated over); `trainer`: the train step."""
    report = {}
    if sys.argv[1] == "ops":
        mesh = mesh_lib.make_mesh((2, 2, 2))
        report = {**ssd_cases(mesh), **dispatcher_cases(mesh), "no_mesh": mesh_lib.batch_split_axes(8)}
    else:
        report = trainer_case()
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
