"""lm-evaluation-harness on any `DecoderLM` (teacher or hybrid): `HybridLMEval` is an `lm_eval` `LM`.

lm-eval (0.4.13 checked) installs and imports without torch: its core requirements are datasets, evaluate,
sacrebleu, scikit-learn, ... — torch is only in its `hf`/`vllm` extras, which this adapter does not use. It is the
project's optional `eval` extra (`pip install '.[eval]'`), never a core dependency. Without lm_eval installed the
class still imports (on a plain base class) and its three methods work on request objects that carry `.args`, so
the scoring core is usable and testable either way; only `run_lm_eval` needs the package.

Conventions (those of lm-eval's own HF model): context and continuation are tokenised separately and joined, so
the continuation's tokens are exactly the ones scored; an empty context is replaced by the prefix token (BOS,
else EOS); too-long inputs are cut from the left; `loglikelihood_rolling` scores every token of the text, each
with up to the model's context of history (disjoint windows whose first token is predicted from the prefix
token); `generate_until` decodes greedily (sampling options are honoured when given) and cuts at the stop strings.
"""

from __future__ import annotations

import difflib
from typing import Any, Sequence

from mamba_llama_jax.errors import ConfigError
from mamba_llama_jax.eval.scoring import Scorer
from mamba_llama_jax.models.llama import DecoderLM

try:
    from lm_eval.api.model import LM as _LMBase

    HAVE_LM_EVAL = True
except ImportError:  # the scoring core stays usable without the optional package
    HAVE_LM_EVAL = False

    class _LMBase:  # type: ignore[no-redef]
        def __init__(self) -> None:
            pass


def _args(req: Any) -> tuple[Any, ...]:
    return tuple(req.args) if hasattr(req, "args") else tuple(req)


class HybridLMEval(_LMBase):
    """An lm-eval `LM` over a `DecoderLM` and its `Tokenizer`."""

    def __init__(self, model: DecoderLM, tokenizer: Any, *, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = 256):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.scorer = Scorer(model, batch_size=batch_size)
        limit = int(model.cfg.max_position_embeddings)
        if max_length is not None and not 2 <= max_length <= limit:
            raise ConfigError(f"max_length {max_length} must lie in [2, the model's context {limit}]")
        self.max_length = max_length or limit
        self.max_gen_toks = max_gen_toks
        self._generator: Any = None
        bos = getattr(getattr(tokenizer, "hf", None), "bos_token_id", None)
        self.prefix_token_id = int(bos) if bos is not None else int(
            tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else tokenizer.pad_token_id)

    # lm-eval reads these for its request batching and caching.
    @property
    def eot_token_id(self) -> int:
        return self.prefix_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(getattr(self.tokenizer, "hf", None), "name_or_path", "mamba_llama_jax"))

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    # ----------------------------------------------------------------------------------------- likelihoods

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request; request.args = (context, continuation)."""
        pairs = []
        for req in requests:
            context, continuation = _args(req)[:2]
            # Trailing spaces belong to the continuation, as lm-eval's HF model moves them.
            n_sp = len(context) - len(context.rstrip())
            if n_sp:
                context, continuation = context[:-n_sp], context[-n_sp:] + continuation
            ctx = self._encode(context) if context else [self.prefix_token_id]
            cont = self._encode(continuation)
            if not ctx:
                ctx = [self.prefix_token_id]
            pairs.append(((ctx + cont)[-self.max_length:-len(cont)] if cont else ctx, cont))
        for ctx, cont in pairs:
            if not cont:
                raise ConfigError("a loglikelihood request has an empty continuation")
            if len(cont) >= self.max_length:
                raise ConfigError(f"a continuation of {len(cont)} tokens does not fit max_length {self.max_length}")
        return [(lp, g) for lp, g, _ in self.scorer.continuation_logprobs(pairs)]

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole texts (request.args = (text,)), summed over disjoint windows of max_length."""
        out = []
        for req in requests:
            text = _args(req)[0]
            ids = self._encode(text)
            if not ids:
                out.append(0.0)
                continue
            rows, spans = [], []
            step = self.max_length - 1
            for start in range(0, len(ids), step):
                piece = ids[start:start + step]
                # The window's history: the prefix token for the first, the tokens before it for the others.
                hist = [self.prefix_token_id] if start == 0 else ids[max(0, start - 1):start]
                rows.append(hist + piece)
                spans.append(len(piece))
            scores = self.scorer.score(rows)
            out.append(float(sum(s.logp[-n:].sum() for s, n in zip(scores, spans))))
        return out

    # ------------------------------------------------------------------------------------------ generation

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations of request.args = (context, gen_kwargs), cut at gen_kwargs['until'] strings."""
        from mamba_llama_jax.inference.generate import Generator, SamplingConfig, truncate_at_stop

        if self._generator is None:
            self._generator = Generator(self.model, pad_id=self.tokenizer.pad_token_id)
        out = []
        for req in requests:
            a = _args(req)
            context, kw = a[0], dict(a[1] if len(a) > 1 and a[1] else {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            sampling = SamplingConfig(temperature=temperature, top_p=float(kw.pop("top_p", 1.0)),
                                      top_k=int(kw.pop("top_k", 0) or 0), max_new_tokens=n_new)
            ids = self._encode(context) or [self.prefix_token_id]
            ids = ids[-(self.max_length - n_new):]
            res = self._generator.run([ids], sampling, eos_ids=self.tokenizer.eos_token_ids)
            out.append(truncate_at_stop(self.tokenizer.decode(res.ids()[0]), until))
        return out


def run_lm_eval(model: DecoderLM, tokenizer: Any, tasks: Sequence[str], *, include_path: str | None = None,
                include_defaults: bool = True, limit: int | float | None = None, num_fewshot: int | None = None,
                batch_size: int = 8, bootstrap_iters: int = 0) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on `tasks` (registered names, or yaml tasks under `include_path`).

    Unknown task names raise a ConfigError with the closest known names, before anything runs.
    """
    if not HAVE_LM_EVAL:
        raise ConfigError("lm-eval is not installed: pip install '.[eval]' (it needs no torch)")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise ConfigError("no lm-eval task given: --lm-eval TASK[,TASK...]")
    tm = TaskManager(include_path=include_path, include_defaults=include_defaults)
    known = set(tm.all_tasks)
    unknown = [t for t in names if t not in known]
    if unknown:
        hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        where = f" (searched {include_path} and the built-in tasks)" if include_path else ""
        raise ConfigError(f"unknown lm-eval task(s) {unknown}{where}; closest names: {hints}. Local tasks need "
                          "--lm-eval-include DIR (a folder of task yaml files)")
    lm = HybridLMEval(model, tokenizer, batch_size=batch_size)
    res = simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                          bootstrap_iters=bootstrap_iters, log_samples=False)
    if res is None:
        raise ConfigError("lm-eval returned no results")
    return {"results": res.get("results", {}), "versions": res.get("versions", {}),
            "n-shot": res.get("n-shot", {}), "config": {"tasks": names, "limit": limit, "num_fewshot": num_fewshot}}
