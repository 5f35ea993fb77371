"""benchmarks/bench_decode_profile.py: the per-step arithmetic on a known timeline, and a CPU smoke run of both
models (the device figures come from the H100)."""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture()
def bdp(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("bench_decode_profile", None)
    import bench_decode_profile

    return bench_decode_profile


def test_summary_splits_wall_time_into_busy_and_gaps(bdp):
    # two steps: kernels overlap once (union 0-3 µs), then idle gaps; times in ns
    ev = [("norm_matmul", 0, 2000), ("decode_attention", 1000, 3000), ("loop_fusion.3", 5000, 6000),
          ("norm_matmul", 10_000, 12_000), ("decode_attention", 12_000, 14_000), ("memcpy", 15_000, 15_500)]
    s = bdp.summarize(ev, steps=2, wall_ms_per_step=0.01)
    assert s["busy_ms"] == pytest.approx((3 + 1 + 4 + 0.5) / 2 / 1e3)
    assert s["gap_ms"] == pytest.approx(0.01 - s["busy_ms"])
    assert s["overlap_ms"] == pytest.approx(1 / 2 / 1e3)  # 1 µs of the first step's two kernels at once
    assert s["kernels"] == 3
    assert s["by_kind"]["fused GEMVs"] == {"ms": pytest.approx(0.002), "count": 1}
    assert s["by_kind"]["decode attention"]["ms"] == pytest.approx(0.002)
    assert s["by_kind"]["copies / memset"]["count"] == 0.5
    assert list(s["top_kernels_ms"])[:2] == ["norm_matmul", "decode_attention"]


def test_kinds_of_the_projects_kernels(bdp):
    assert bdp.kind_of("decode_attention") == "decode attention"
    assert bdp.kind_of("norm_gate_up") == "fused GEMVs" and bdp.kind_of("attn_combine_residual") == "fused GEMVs"
    assert bdp.kind_of("multistep_verify") == "Mamba kernels" and bdp.kind_of("mamba2_chunk__2") == "Mamba kernels"
    assert bdp.kind_of("verify_attention") == "decode attention"
    assert bdp.kind_of("gate_up_weighed") == "fused GEMVs" and bdp.kind_of("matmul_residual_weigh") == "fused GEMVs"
    assert bdp.kind_of("lm_head_argmax") == "LM head"
    assert bdp.kind_of("input_reduce_fusion_2") == "XLA fusions"
    assert bdp.kind_of("sm90_xmma_gemm_bf16") == "cuBLAS / GEMM"
    assert bdp.kind_of("nvjet_sm90_tss_144x64_64x8_4x1_v_bz_TNN") == "cuBLAS / GEMM"
    assert bdp.kind_of("something_else") == "other"


def test_tiny_run_profiles_both_models(bdp, tmp_path):
    assert bdp.main(["--tiny", "--batches", "1", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "decode_profile_tiny.json").read_text())
    assert [row["model"] for row in r["rows"]] == ["teacher", "attn50%"]
    for row in r["rows"]:
        assert "error" not in row, row
        assert row["wall_ms"] > 0 and 0 < row["busy_ms"] and row["gap_ms"] >= 0 and row["kernels"] > 0, row
    assert "| teacher | 1 | default |" in (tmp_path / "decode_profile_tiny.md").read_text()
    assert not (tmp_path / "decode_profile.json").exists()


def test_variants_parse_and_restore_the_defaults(bdp, monkeypatch):
    from pallas_kernels import decode_attention as da
    from pallas_kernels import fused_decode as fd

    assert bdp.parse_variant("default") == ({}, {})
    assert bdp.parse_variant("bn1w1+c16") == ({"row_block": 1, "row_warps": 1, "combine_block": 16}, {})
    assert bdp.parse_variant("xla") == ({}, {"MAMBA_LLAMA_FUSED_DECODE": "0"})
    assert bdp.parse_variant("uv") == ({}, {"MAMBA_LLAMA_UNVERIFIED_KERNELS": "1"})
    assert bdp.parse_variant("fd64+bn2") == ({"row_block": 2}, {"MAMBA_LLAMA_FUSED_DECODE": "64"})
    assert bdp.parse_variant("kq4+aew") == ({"attn_dot": False}, {"MAMBA_LLAMA_DECODE_SPLIT_K": "4"})
    assert bdp.parse_variant("kq0") == ({}, {"MAMBA_LLAMA_DECODE_SPLIT_K": "0"})
    assert bdp.parse_variant("as3+ab64") == ({"attn_stages": 3, "attn_block": 64}, {})
    assert bdp.parse_variant("s4+mk") == ({"attn_splits": 4, "merge": "kernel"}, {})
    assert bdp.parse_variant("mx")[0] == {"merge": "xla"}
    assert bdp.parse_variant("s1+ab64+aw8")[0] == {"attn_splits": 1, "attn_block": 64, "attn_warps": 8}
    assert bdp.parse_variant("amk+s4")[0] == {"attn_merge": "kernel", "attn_splits": 4}
    assert bdp.parse_variant("amx+s2+sw")[0] == {"attn_merge": "xla", "attn_splits": 2, "attn_shares": "window"}
    assert bdp.parse_variant("sf")[0] == {"attn_shares": "fill"}
    assert bdp.parse_variant("mc+g64")[0] == {"merge": "combine", "dot_rows": 64}
    assert bdp.parse_variant("adot+s1")[0] == {"attn_dot": True, "attn_splits": 1}
    assert bdp.parse_variant("aew")[0] == {"attn_dot": False}
    assert bdp.parse_variant("ana+ab32")[0] == {"attn_newest": "after", "attn_block": 32}
    assert bdp.parse_variant("ah1+ana")[0] == {"attn_heads": 1, "attn_newest": "after"}
    assert bdp.parse_variant("anb")[0] == {"attn_newest": "block"}
    assert bdp.parse_variant("hw+ana") == ({"attn_newest": "after"}, {})  # hw: read by profile_variant
    assert bdp.parse_variant("guw+sqo") == ({"squares": "o"}, {"MAMBA_LLAMA_DECODE_GATE_UP": "weighed"})
    assert bdp.parse_variant("sqg")[0] == {"squares": "gate_up"}
    assert bdp.parse_variant("lmk+sqo") == ({"squares": "o"}, {"MAMBA_LLAMA_LM_HEAD_KERNEL": "1"})
    assert bdp.parse_variant("fd64+g32+db64") == ({"dot_rows": 32, "dot_block": 64}, {"MAMBA_LLAMA_FUSED_DECODE": "64"})
    assert bdp.parse_variant("cublas") == ({}, {"MAMBA_LLAMA_DECODE_GEMM": "cublas"})
    assert bdp.parse_variant("as2+gu+uv+g64+ds8") == (
        {"attn_stages": 2, "dot_rows": 64, "dot_stages": 8},
        {"MAMBA_LLAMA_DECODE_GATE_UP": "kernel", "MAMBA_LLAMA_UNVERIFIED_KERNELS": "1"})
    assert bdp.parse_variant("gu+db32+dk32")[0] == {"dot_block": 32, "dot_k": 32}
    assert bdp.parse_variant("guw+uv")[1] == {"MAMBA_LLAMA_DECODE_GATE_UP": "weighed",
                                              "MAMBA_LLAMA_UNVERIFIED_KERNELS": "1"}
    with pytest.raises(SystemExit, match="unknown variant setting"):
        bdp.parse_variant("vp3")
    with pytest.raises(SystemExit, match="unknown variant setting"):
        bdp.parse_variant("ana+apv1")  # measured and removed (decode_profile_s26_b64.md)
    with pytest.raises(SystemExit, match="unknown variant setting"):
        bdp.parse_variant("apf")  # measured and removed (decode_profile_s27_prefetch.md)
    # measured and removed (generate_s29_lm_pdl.md, generate_s29_wdk.md, generate_s32.md, decode_profile_s3*.md)
    for removed in ("pdl", "wdk", "afe", "afl", "pfo", "pfoe", "pfs", "pfn", "pfl"):
        with pytest.raises(SystemExit, match="unknown variant setting"):
            bdp.parse_variant(removed)
    with pytest.raises(SystemExit, match="unknown variant setting"):
        bdp.parse_variant("bn1+fast")
    monkeypatch.delenv("MAMBA_LLAMA_FUSED_DECODE", raising=False)
    seen = {}

    def fake_profile(model, batch, *args, hot_weights=False):
        seen.update(block=fd.pick_block_n(576, 1), combine=fd.pick_block_n(576, 1, combine=True),
                    warps=fd.pick_warps(1), env=os.environ.get("MAMBA_LLAMA_FUSED_DECODE"),
                    splits=da.plan(1, 3, 384, max_splits=16)[1], merge=fd.merge_mode(), dot=da.planned_dot(64),
                    shares=da.planned_shares(), newest=da.planned_newest(64), heads=da.planned_heads(3, 64),
                    hot=hot_weights)
        return {}
    monkeypatch.setattr(bdp, "profile_decode", fake_profile)
    defaults = (fd.pick_block_n(576, 1), fd.pick_block_n(576, 1, combine=True), fd.pick_warps(1),
                da.plan(1, 3, 384, max_splits=16), fd.merge_mode())
    dot_default = da.planned_dot(64)
    bdp.profile_variant("bn2w2+c16+fd4+s2+mx+aew", None, 1)
    assert seen == {"block": 2, "combine": 16, "warps": 2, "env": "4", "splits": 2, "merge": "xla", "dot": False,
                    "shares": "fill", "newest": "after", "heads": 3, "hot": False}
    bdp.profile_variant("adot+sw+anb+ah1+hw", None, 1)
    assert seen["dot"] is True and seen["shares"] == "window" and seen["newest"] == "block" and seen["hot"] is True
    assert seen["heads"] == 1
    assert da.planned_dot(64) is dot_default and da.planned_shares() == "fill" and da.planned_newest(64) == "after"
    assert da.planned_heads(3, 64) == 3
    # everything back as it was
    assert (fd.pick_block_n(576, 1), fd.pick_block_n(576, 1, combine=True), fd.pick_warps(1),
            da.plan(1, 3, 384, max_splits=16), fd.merge_mode()) == defaults
    assert "MAMBA_LLAMA_FUSED_DECODE" not in os.environ
    with pytest.raises(Exception, match="power of two"):
        with fd.tiling(row_block=3):
            pass


@pytest.mark.slow  # 23 s on 2 cores (2026-12-07): `make test-slow`
def test_tiny_run_with_variants(bdp, tmp_path):
    assert bdp.main(["--tiny", "--models", "teacher", "--batches", "1", "--variants",
                     "default,bn1w1+c16,xla,s2+mk+adot", "--stem", "decode_variants", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "decode_variants_tiny.json").read_text())
    assert [row["variant"] for row in r["rows"]] == ["default", "bn1w1+c16", "xla", "s2+mk+adot"]
    assert all("error" not in row and row["busy_ms"] > 0 for row in r["rows"])
    text = (tmp_path / "decode_variants_tiny.md").read_text()
    assert "| teacher | 1 | bn1w1+c16 |" in text


def test_each_variant_records_its_own_choices(bdp, tmp_path):
    """A variant whose trace does not reach an op shows "none" for it, not the previous variant's choice (16 rows:
    the default routes the MLP through `fused_decode.gate_up`, the reference on the CPU; `gux` does not call it;
    `gu`, the default named, calls it again); the teacher's trace never reaches `mamba2_decode`."""
    assert bdp.main(["--tiny", "--models", "teacher", "--batches", "16", "--new-tokens", "4", "--variants",
                     "default,gux,gu", "--stem", "choices", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "choices_tiny.json").read_text())["rows"]
    assert [r["chosen"]["gate_up"] for r in rows] == ["reference_xla", "none", "reference_xla"]
    assert [r["chosen"]["mamba2_decode"] for r in rows] == ["none", "none", "none"]
    assert all(r["chosen"]["qkv_projection"] == "norm_matmul" for r in rows)


def test_bad_model_name_and_deadline(bdp, tmp_path):
    with pytest.raises(SystemExit, match="unknown model 'student'"):
        bdp.main(["--tiny", "--models", "student", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown variant setting"):  # before anything is compiled
        bdp.main(["--tiny", "--variants", "default,turbo", "--out", str(tmp_path)])
    # a deadline already passed: every row is listed as skipped, none measured
    assert bdp.main(["--tiny", "--models", "teacher", "--batches", "1", "--deadline-s", "1e-9",
                     "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "decode_profile_tiny.json").read_text())
    assert r["rows"] == [] and r["skipped"] == ["teacher b=1 default"]
    assert "Skipped at the deadline: teacher b=1 default" in (tmp_path / "decode_profile_tiny.md").read_text()


def test_command_buffered_loops_stop_the_run(bdp, tmp_path, monkeypatch):
    """XLA_FLAGS that record the decode loop as a CUDA graph hide its kernels from the profiler: a clear stop before
    anything is compiled, naming the way out."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL")
    with pytest.raises(SystemExit, match="does not see; profile without them"):
        bdp.main(["--tiny", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_hot_weights_share_layer_zeros_arrays(bdp):
    """`hw`: every layer's arrays become layer 0's where shapes match (the hybrid's Mamba and attention layers keep
    their own where they differ), nothing outside the layers changes, and the shared state still decodes."""
    import jax

    from mamba_llama_jax.inference.generate import Generator

    models = bdp._models(True)
    for name, model in models.items():
        state = Generator(model).state
        names = lambda p: tuple(getattr(k, "key", getattr(k, "name", k)) for k in p)
        flat = {names(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
        shared = {names(p): x for p, x in jax.tree_util.tree_flatten_with_path(bdp.shared_layer_weights(state))[0]}
        assert flat.keys() == shared.keys()

        def layer(path, i):  # the same path in layer i
            at = path.index("layers") + 1
            return path[:at] + (i,) + path[at + 1:]

        n_shared = 0
        for path, x in shared.items():
            if "layers" not in path:
                assert x is flat[path]
                continue
            first = flat.get(layer(path, 0))
            if first is not None and first.shape == x.shape and first.dtype == x.dtype:
                assert x is first, (name, path)
                n_shared += 1
            else:
                assert x is flat[path]
        assert n_shared > len([p for p in flat if "layers" in p and p[p.index("layers") + 1] == 0]), name
    assert bdp.main(["--tiny", "--models", "teacher", "--batches", "2", "--variants", "hw"]
                    + ["--out", os.environ.get("TMPDIR", "/tmp") + "/hw_smoke"]) == 0
