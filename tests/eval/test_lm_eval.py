"""lm-eval adapter: loglikelihood and rolling loglikelihood equal a direct forward pass; a local yaml task runs
through lm-eval's own evaluator (lm-eval installs without torch); unknown tasks fail with a project error."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_oracle import copy_model  # noqa: E402

from mamba_llama_jax.convert import load_teacher
from mamba_llama_jax.errors import ConfigError
from mamba_llama_jax.eval.lm_eval_adapter import HAVE_LM_EVAL, HybridLMEval, run_lm_eval

ROOT = Path(__file__).parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny_llama"
TASKS = ROOT / "tests" / "fixtures" / "lm_eval_tasks"


class Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(FIXTURE, dtype="float32")


def direct_logprobs(model, ids):
    logits, _ = model(jax.numpy.asarray([ids]))
    lp = np.asarray(jax.nn.log_softmax(logits[0, :-1].astype(np.float32), -1))
    return lp[np.arange(len(ids) - 1), ids[1:]], lp.argmax(-1) == np.asarray(ids[1:])


def test_loglikelihood_equals_direct_computation(teacher):
    lm = HybridLMEval(teacher.model, teacher.tokenizer, batch_size=2)
    tok = teacher.tokenizer
    reqs = [Req("The capital of France is", " Paris"), Req("Two plus two is ", "four"), Req("", "hello")]
    got = lm.loglikelihood(reqs)
    cases = [("The capital of France is", " Paris"), ("Two plus two is", " four"), (None, "hello")]
    for (ctx, cont), (lp, greedy) in zip(cases, got):
        c = tok.encode(ctx) if ctx else [lm.prefix_token_id]
        n = len(tok.encode(cont))
        want, g = direct_logprobs(teacher.model, c + tok.encode(cont))
        assert lp == pytest.approx(float(want[-n:].sum()), abs=1e-4) and greedy == bool(g[-n:].all())


def test_rolling_equals_direct_computation(teacher):
    tok = teacher.tokenizer
    text = "A short text to score, token by token, for the rolling log-likelihood."
    ids = tok.encode(text)
    lm = HybridLMEval(teacher.model, tok)
    want, _ = direct_logprobs(teacher.model, [lm.prefix_token_id] + ids)
    assert lm.loglikelihood_rolling([Req(text)])[0] == pytest.approx(float(want.sum()), abs=1e-3)
    # Windows of 16 tokens: each sees its predecessor's last token, the first the prefix token.
    small = HybridLMEval(teacher.model, tok, max_length=16)
    total, start = 0.0, 0
    while start < len(ids):
        hist = [lm.prefix_token_id] if start == 0 else ids[start - 1:start]
        piece = ids[start:start + 15]
        lp, _ = direct_logprobs(teacher.model, hist + piece)
        total += float(lp[-len(piece):].sum())
        start += 15
    assert small.loglikelihood_rolling([Req(text)])[0] == pytest.approx(total, abs=1e-3)


def test_copying_model_is_greedy_on_repeats_and_generates(teacher):
    lm = HybridLMEval(copy_model(300, max_len=512), teacher.tokenizer)
    (lp, greedy), = lm.loglikelihood([Req("red green blue red green", " blue")])
    assert greedy and lp > -1e-3
    out = lm.generate_until([Req("one two three. one two", {"until": ["."], "max_gen_toks": 10})])
    assert out == [" three"]


@pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval not installed (pip install '.[eval]')")
def test_local_task_through_lm_eval(teacher, tmp_path):
    yaml = (TASKS / "copy_choice.yaml").read_text().replace(
        "tests/fixtures/lm_eval_tasks/copy_choice.jsonl", str(TASKS / "copy_choice.jsonl"))
    (tmp_path / "copy_choice.yaml").write_text(yaml)
    model = copy_model(300, max_len=512)
    res = run_lm_eval(model, teacher.tokenizer, ["copy_choice"], include_path=str(tmp_path), include_defaults=False)
    assert res["results"]["copy_choice"]["acc,none"] == 1.0
    with pytest.raises(ConfigError, match="unknown lm-eval task.*copy_choise"):
        run_lm_eval(model, teacher.tokenizer, ["copy_choise"], include_path=str(tmp_path), include_defaults=False)
