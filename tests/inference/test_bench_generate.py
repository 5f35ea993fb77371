"""benchmarks/bench_generate.py's compiled prefill + decode loop (shared with bench_decode_profile): what it runs
is what `Generator.run` produces for the same prompts, greedy, every step taken."""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[2]


def test_compiled_generate_equals_the_generator(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import jax.numpy as jnp

    import bench_generate as bg
    from mamba_llama_jax.inference.generate import Generator, SamplingConfig

    model = bg._jax_model(None, tiny=True)
    gen = Generator(model)
    prompts = np.random.default_rng(0).integers(1, gen.cfg.vocab_size, (2, 8))
    c = bg.compile_generate(gen, jnp.asarray(prompts, jnp.int32), 6)
    pre_s, dec_s, toks = c.once()
    assert pre_s > 0 and dec_s > 0 and toks.shape == (2, 6)
    want = gen.run([list(map(int, p)) for p in prompts], SamplingConfig(max_new_tokens=6)).ids()
    assert [list(map(int, t)) for t in np.asarray(toks)] == [list(map(int, w)) for w in want]
    first, cache = c.prefill()
    np.testing.assert_array_equal(np.asarray(c.decode(first, cache)), np.asarray(toks))  # deterministic, reusable
    sys.modules.pop("bench_generate", None)
