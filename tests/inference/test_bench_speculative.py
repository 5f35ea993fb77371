"""benchmarks/bench_speculative.py's comparison of speculative with plain greedy output."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def test_first_divergence(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_speculative as bs

    assert bs.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert bs.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert bs.first_divergence([9, 2, 3], [1, 2, 4]) == 0
    assert bs.first_divergence([1, 2], [1, 2, 3]) == 2
    assert bs._median_or_dash([]) == "—" and bs._median_or_dash([3, 7, 100]) == "7"
    sys.modules.pop("bench_speculative", None)


def _row(**kw):
    nan = float("nan")
    row = dict(shape="target", batch=1, prompts=8, k=3, impl="kernel", plain_tok_s=1000.0, spec_tok_s=600.0,
               measured_acceptance=0.5 / 3, tokens_per_round=1.5, identical_share=0.5, first_divergence=[40],
               t_plain_step=nan, t_verify=nan, t_draft_step=nan, t_draft_2tok=nan,
               projected_speedup={str(a): nan for a in (0.5, 0.6, 0.7, 0.8, 0.9)})
    row.update(kw)
    return row


def test_loop_projection_scales_the_measured_round(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_speculative as bs

    assert bs.tokens_per_round(2, 0.5) == 1.75 and bs.tokens_per_round(3, 1.0) == 4.0
    row = _row()
    # a round took 1.5 tokens / 600 tok/s = 2.5 ms, 2.5 plain steps: at best 4 tokens a round -> 1.6x
    assert abs(bs.loop_projected(row, 1.0) - 1.6) < 1e-12
    assert abs(bs.loop_projected(row, 0.5) - 1.875 / 1.5 * 0.6) < 1e-12
    # at the measured acceptance (i.i.d. model) it gives back the measured ratio when the model fits the round
    fit = _row(tokens_per_round=bs.tokens_per_round(3, 0.4))
    assert abs(bs.loop_projected(fit, 0.4) - 0.6) < 1e-12
    sys.modules.pop("bench_speculative", None)


def test_render_saved_rewrites_the_markdown_from_the_json(monkeypatch, tmp_path):
    import json

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_speculative as bs

    results = dict(date="2026-12-04", device="cpu", versions={"jax": "x"}, dtype="bfloat16", prompt_len=128,
                   new_tokens=128, command="bench_speculative.py --target /t --draft /d --k 3 --deadline-s 60",
                   real_models=True, xla_flags="", runs=[_row()], skipped=["target b=4"], wall_s=95.0)
    path = tmp_path / "speculative.json"
    path.write_text(json.dumps(results))
    md = bs.render_saved(path).read_text()
    assert md == (tmp_path / "speculative.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| shape"))
    row = next(line for line in md.splitlines() if line.startswith("| target"))
    assert header.count("|") == row.count("|") and "loop@1.0" in header
    assert row.rstrip(" |").endswith("1.60")  # the ceiling, last column
    assert "(--deadline-s 60): skipped target b=4" in md  # the deadline from the recorded command
    # a hand-written reading under the tables survives a re-render; the tables are the new ones
    (tmp_path / "speculative.md").write_text("# old\n\n| stale |\n\n## Reading (by hand)\n\nThe figures say x.\n")
    again = bs.render_saved(path).read_text()
    assert again.startswith(md.rstrip("\n")) and again.endswith("\n## Reading (by hand)\n\nThe figures say x.\n")
    assert "| stale |" not in again
    assert "Kernels the dispatchers chose" not in md  # rows of older runs carry no record
    picked = {**_row(), "verify_choice": "pallas_triton",
              "kernel_choices": {"verify_attention": "pallas_triton", "mamba2_chunk": None,
                                 "verify_rows_fused": "True"}}
    out = bs.render_md({**results, "runs": [picked]}, bs.build_parser().parse_args(["--k", "3"]))
    assert ("- target b=1 k=3 kernel slots×16: verify pallas_triton, verify_attention pallas_triton, mamba2_chunk "
            "None, verify_rows_fused True") in out
    # the cache rounding: rows saved before it was recorded ran the decoder's old one (the prompt multiple, 16)
    assert header.split(" | ")[5] == "slots×" and row.split(" | ")[5] == "16"
    rounded = bs.render_md({**results, "runs": [_row(slot_multiple=128)]}, bs.build_parser().parse_args([]))
    assert next(line for line in rounded.splitlines() if line.startswith("| target")).split(" | ")[5] == "128"
    sys.modules.pop("bench_speculative", None)


def test_one_decoder_a_slot_multiple(monkeypatch):
    """--slot-multiple: one SpeculativeDecoder per value (default the attention kernels' longest block)."""
    import argparse
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_speculative as bs
    from pallas_kernels.decode_attention import MAX_BLOCK

    made = []
    monkeypatch.setattr(bs, "SpeculativeDecoder", lambda *a, slot_multiple, **kw: made.append(slot_multiple))
    monkeypatch.setattr(bs, "Generator", lambda *a, **kw: None)
    over = bs.Deadline(0.0, end=0.0)
    for argv, want in (([], [MAX_BLOCK]), (["--slot-multiple", "16", "128"], [16, 128])):
        args = bs.build_parser().parse_args(argv)
        assert isinstance(args, argparse.Namespace) and args.slot_multiple == want
        made.clear()
        results = dict(skipped=[], runs=[])
        target = SimpleNamespace(cfg=SimpleNamespace(vocab_size=10))
        bs.run_pair("tiny", target, None, None, args, over, results, lambda: None)
        assert made == want and results["skipped"] == ["tiny b=1", "tiny b=16"]
    sys.modules.pop("bench_speculative", None)


def test_divergence_margins_read_the_target_at_the_split(monkeypatch):
    """The margin is the target's top-1 minus top-2 logit after the common prefix, the same whether the case is
    alone or right-padded beside a longer one."""
    import jax
    import numpy as np

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_speculative as bs

    target, _ = bs.make_models("tiny", "float32")
    rng = np.random.default_rng(0)
    vocab = target.cfg.vocab_size
    short = (rng.integers(0, vocab, 5).tolist(), rng.integers(0, vocab, 6), 2)
    long = (rng.integers(0, vocab, 9).tolist(), rng.integers(0, vocab, 6), 5)

    @jax.jit
    def logits_of(seq):
        h, _ = target.hidden(seq)
        return target.logits(h[:, -1])[0]

    def direct(case):
        prompt, plain, pos = case
        top = np.sort(np.asarray(logits_of(jax.numpy.asarray(prompt + list(plain[:pos]), np.int32)[None])))[::-1]
        return top[0] - top[1]

    both = bs.divergence_margins(target, [short, long])
    assert np.allclose(both, [direct(short), direct(long)], rtol=1e-4, atol=1e-5)
    assert min(both) >= 0 and bs.divergence_margins(target, []) == []
    assert bs._margin([0.1, 0.5, 0.02]) == "0.10 (0.50)" and bs._margin(None) == "—"
    sys.modules.pop("bench_speculative", None)


def test_profile_run_summarises_per_unit(monkeypatch):
    """On the CPU the profile holds the XLA executor's events: the summary divides them by the units."""
    import jax.numpy as jnp

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_speculative as bs

    x = jnp.ones((64, 64))
    f = lambda: [(x @ x).block_until_ready() for _ in range(4)]
    f()
    one = bs.profile_run(f, lambda res: 1)
    four = bs.profile_run(f, lambda res: len(res))
    assert "error" not in one and four["units"] == 4 and one["units"] == 1
    assert one["kernels"] > 0 and abs(four["kernels"] * 4 - one["kernels"]) <= 4 and four["busy_ms"] > 0
    sys.modules.pop("bench_speculative", None)


def test_render_flag_rewrites_and_refuses_what_is_not_a_result(monkeypatch, tmp_path, capsys):
    import json

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_speculative as bs

    results = dict(date="2026-12-04", device="cpu", versions={"jax": "x"}, dtype="bfloat16", prompt_len=128,
                   new_tokens=128, command="bench_speculative.py --target /t --draft /d --k 3", real_models=True,
                   xla_flags="", runs=[_row()], skipped=[], wall_s=95.0)
    path = tmp_path / "speculative.json"
    path.write_text(json.dumps(results))
    bs.main(["--render", str(path)])
    assert "loop@1.0" in capsys.readouterr().out and (tmp_path / "speculative.md").exists()
    for bad, text in (("missing.json", None), ("garbage.json", "{not json"), ("other.json", '{"rows": []}')):
        if text is not None:
            (tmp_path / bad).write_text(text)
        with pytest.raises(SystemExit):
            bs.main(["--render", str(tmp_path / bad)])
        assert "not a saved speculative.json" in capsys.readouterr().err
    sys.modules.pop("bench_speculative", None)


def test_profile_runs_without_command_buffers(monkeypatch, tmp_path):
    """--profile never adds the command-buffer flags (the profiler cannot see their kernels), and stops at once if
    XLA_FLAGS already has them."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_speculative as bs

    added = []
    monkeypatch.setattr(bs, "device_flags", lambda enable: added.append(enable))
    monkeypatch.setattr(bs, "Deadline", lambda *a: (_ for _ in ()).throw(RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        bs.main(["--profile", "--out", str(tmp_path)])
    with pytest.raises(RuntimeError, match="stop here"):
        bs.main(["--out", str(tmp_path)])
    assert added == [False, True]
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL")
    with pytest.raises(SystemExit, match="does not see"):
        bs.main(["--profile", "--out", str(tmp_path)])
    sys.modules.pop("bench_speculative", None)


@pytest.mark.slow
def test_tiny_run_with_profile(monkeypatch, tmp_path):
    """The whole script on the CPU with --profile: every row has a round and a plain-step profile."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_speculative as bs

    bs.main(["--tiny", "--impls", "kernel", "--profile", "--draft-vocab", "100", "--stop", "0.5",
             "--out", str(tmp_path)])
    runs = json.loads((tmp_path / "speculative.json").read_text())["runs"]
    assert runs and all(set(r["profile"]) == {"round", "plain_step"} for r in runs)
    assert all("error" not in pr and pr["units"] >= 1 for r in runs for pr in r["profile"].values())
    assert all(1 <= r["drafts_per_round"] <= r["k"] for r in runs)
    md = (tmp_path / "speculative.md").read_text()
    assert "Where a round and a plain step go" in md and "--draft-vocab 100" in md and "below 0.5" in md
    # which implementation each dispatcher picked is recorded: on the CPU the references, no fused verify rows
    choices = runs[0]["kernel_choices"]
    assert choices["verify_rows_fused"] == "False" and choices["verify_attention"] == "reference_xla", choices
    assert choices["decode_attention"] == "reference_xla" and choices["mamba2_chunk"] in (None, "reference_xla")
    assert "Kernels the dispatchers chose" in md and "verify_attention reference_xla" in md
    sys.modules.pop("bench_speculative", None)


def test_draft_vocab_coverage_counts(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_draft_vocab as bd

    held = [[0, 1, 5, 9], [2, 9], []]
    train = [[9, 9, 5], [9, 5, 7]]  # by frequency: 9, 5, 7, then 0, 1, ...
    rows = bd.coverage(held, train, vocab=10, sizes=[2, 3], keep=(9,))
    # first 2 ids + 9 = {0, 1, 9}: 4 of 6 held-out tokens; top 2 by frequency = {9, 5}: 3 of 6
    assert rows[0] == dict(size=2, head_share=0.3, first_n=4 / 6, frequency_top_n=3 / 6)
    assert rows[1]["first_n"] == 5 / 6 and rows[1]["frequency_top_n"] == 3 / 6  # {0,1,2,9}; {9,5,7}
    sys.modules.pop("bench_draft_vocab", None)


def test_draft_vocab_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_draft_vocab as bd

    tiny = ROOT / "tests" / "fixtures" / "tiny_llama"
    bd.main(["--target", str(tiny), "--heldout-prompts", "2", "--train-prompts", "2", "--new-tokens", "4",
             "--sizes", "8", "16", "--out", str(tmp_path)])
    md = (tmp_path / "draft_vocab.md").read_text()
    assert "| 8 |" in md and "| 16 |" in md and (tmp_path / "draft_vocab.json").is_file()
    with pytest.raises(SystemExit):
        bd.main(["--target", str(tiny), "--sizes", "100000000", "--out", str(tmp_path)])
    sys.modules.pop("bench_draft_vocab", None)
