"""AlpacaEval / MT-Bench-style answers and an offline pairwise comparison judged by the teacher.

WHAT THIS MEASURES: fidelity to the teacher, not answer quality. The judge is the teacher itself (no network, no
stronger model here), so a student scores well by answering the way the teacher would. Two signals:
- `norm_logprob`: the teacher's mean log-probability per token of each answer given the prompt (length-normalised,
  so short answers are not favoured). The teacher's own greedy answer is close to the maximum by construction.
- `judge`: the teacher asked, with a judge prompt, which of two answers is better — once with the student's answer
  as A and once as B, to cancel position bias; read as the teacher's probability of the token "A" vs "B"
  (never generated text, so no parsing). A 135M teacher is a weak judge: treat this as a sanity signal.
Answer lengths (tokens) are reported for every answer, since both signals and any judge react to length.

`APIJudge` is the adapter for a real judge model behind an OpenAI-compatible chat-completions endpoint (what
AlpacaEval uses), for users with network access. UNTESTED HERE: this project's machines have no network.

Prompt files: .txt (one prompt per line), or .json/.jsonl rows with `instruction` (AlpacaEval), `prompt`,
`turns` (MT-Bench; the first turn is used) or `messages` (the first user message).
"""

from __future__ import annotations

import json
import math
import os
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from mamba_llama_jax.errors import ConfigError, DataError
from mamba_llama_jax.eval.scoring import Scorer
from mamba_llama_jax.models.llama import DecoderLM

LABEL = "fidelity to the teacher (the teacher judges): not a measure of answer quality"

JUDGE_TEMPLATE = (
    "You are comparing two answers to the same question. Pick the one that is more helpful, correct and clear.\n\n"
    "Question: {prompt}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
    "Which answer is better? Reply with the single letter A or B."
)


def load_prompts(path: str | Path, limit: int = 0) -> list[str]:
    """Prompts from a .txt (one a line) or .json/.jsonl file (module docstring for the accepted columns)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompt file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"prompt file {p} is empty")
    if p.suffix in (".json", ".jsonl"):
        try:
            rows = json.loads(text) if p.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e})") from None
        if isinstance(rows, dict):
            rows = [rows]
        prompts = []
        for i, r in enumerate(rows):
            if isinstance(r, str):
                prompts.append(r)
            elif isinstance(r, dict) and isinstance(r.get("instruction"), str):
                prompts.append(r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else ""))
            elif isinstance(r, dict) and isinstance(r.get("prompt"), str):
                prompts.append(r["prompt"])
            elif isinstance(r, dict) and isinstance(r.get("turns"), list) and r["turns"]:
                prompts.append(str(r["turns"][0]))
            elif isinstance(r, dict) and isinstance(r.get("messages"), list):
                user = next((m.get("content") for m in r["messages"] if m.get("role") == "user"), None)
                if not isinstance(user, str):
                    raise DataError(f"{p} row {i}: no user message")
                prompts.append(user)
            else:
                raise DataError(f"{p} row {i}: expected a string or a dict with `instruction`, `prompt`, `turns` "
                                f"or `messages`, got {r!r:.80}")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    prompts = [x for x in prompts if x.strip()]
    if not prompts:
        raise DataError(f"prompt file {p} holds no prompts")
    return prompts[:limit] if limit else prompts


def generate_answers(model: DecoderLM, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 256,
                     batch_size: int = 8) -> list[list[int]]:
    """Greedy chat answers, as token ids (EOS excluded)."""
    from mamba_llama_jax.inference.generate import Generator, SamplingConfig

    gen = Generator(model, pad_id=tokenizer.pad_token_id)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    out: list[list[int]] = []
    for b in range(0, len(prompts), batch_size):
        ids = gen.encode_prompts(tokenizer, prompts[b:b + batch_size], chat=True)
        out += gen.run(ids, sampling, eos_ids=tokenizer.eos_token_ids).ids()
    return out


def answer_logprobs(scorer: Scorer, tokenizer: Any, prompts: Sequence[str], answers: Sequence[Sequence[int]]
                    ) -> list[float]:
    """Mean log-prob per answer token under the scorer's model (the answer as the assistant turn); -inf-free:
    an empty answer scores its end-of-turn token alone."""
    eos = list(tokenizer.eos_token_ids[:1])
    pairs = []
    for p, a in zip(prompts, answers):
        ctx = tokenizer.encode_chat([{"role": "user", "content": p}])
        pairs.append((ctx, list(a) + eos if eos else list(a) or [tokenizer.pad_token_id]))
    return [lp / n for lp, _, n in scorer.continuation_logprobs(pairs)]


def judge_preference(scorer: Scorer, tokenizer: Any, prompt: str, a: str, b: str) -> float:
    """P(the judge prefers A) = p("A") / (p("A") + p("B")) at the start of the judge's answer."""
    ctx = tokenizer.encode_chat([{"role": "user", "content": JUDGE_TEMPLATE.format(prompt=prompt, a=a, b=b)}])
    ta, tb = tokenizer.encode("A"), tokenizer.encode("B")
    (la, _, _), (lb, _, _) = scorer.continuation_logprobs([(ctx, ta[:1]), (ctx, tb[:1])])
    return 1.0 / (1.0 + math.exp(lb - la))


def compare(student: DecoderLM, teacher: DecoderLM, tokenizer: Any, prompts: Sequence[str], *,
            max_new_tokens: int = 256, batch_size: int = 8, judge: bool = True,
            api_judge: "APIJudge | None" = None) -> dict[str, Any]:
    """Student vs teacher answers to `prompts`, judged by the teacher (module docstring). Win rates are the
    student's: 0.5 = indistinguishable from the teacher to the teacher."""
    if not prompts:
        raise DataError("no prompts to answer")
    s_ids = generate_answers(student, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    t_ids = generate_answers(teacher, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scorer = Scorer(teacher, batch_size=batch_size)
    s_lp = answer_logprobs(scorer, tokenizer, prompts, s_ids)
    t_lp = answer_logprobs(scorer, tokenizer, prompts, t_ids)
    rows = []
    for i, p in enumerate(prompts):
        sa, ta = tokenizer.decode(s_ids[i]).strip(), tokenizer.decode(t_ids[i]).strip()
        row: dict[str, Any] = {"prompt": p, "student": sa, "teacher": ta, "student_tokens": len(s_ids[i]),
                               "teacher_tokens": len(t_ids[i]), "student_norm_logprob": s_lp[i],
                               "teacher_norm_logprob": t_lp[i], "identical": s_ids[i] == t_ids[i]}
        if judge:
            # Student as A, then as B: averaging cancels the judge's bias for a position.
            first = judge_preference(scorer, tokenizer, p, sa, ta)
            second = 1.0 - judge_preference(scorer, tokenizer, p, ta, sa)
            row.update(judge_student_first=first, judge_student_second=second, judge_student=(first + second) / 2)
        if api_judge is not None:
            row["api_judge_student"] = api_judge.preference(p, sa, ta)
        rows.append(row)
    n = len(rows)
    summary: dict[str, Any] = {
        "label": LABEL, "prompts": n,
        "student_mean_tokens": sum(r["student_tokens"] for r in rows) / n,
        "teacher_mean_tokens": sum(r["teacher_tokens"] for r in rows) / n,
        "student_norm_logprob": sum(s_lp) / n, "teacher_norm_logprob": sum(t_lp) / n,
        "logprob_win_rate": sum((r["student_norm_logprob"] > r["teacher_norm_logprob"])
                                + 0.5 * (r["student_norm_logprob"] == r["teacher_norm_logprob"]) for r in rows) / n,
        "identical_answers": sum(r["identical"] for r in rows) / n,
    }
    if judge:
        summary["judge_win_rate"] = sum(r["judge_student"] for r in rows) / n
        summary["judge_position_consistency"] = sum(
            (r["judge_student_first"] > 0.5) == (r["judge_student_second"] > 0.5) for r in rows) / n
    if api_judge is not None:
        summary["api_judge_win_rate"] = sum(r["api_judge_student"] for r in rows) / n
    return {"summary": summary, "rows": rows}


class APIJudge:
    """A judge model behind an OpenAI-compatible `/chat/completions` endpoint. UNTESTED HERE (no network).

    `preference(prompt, student, reference)` asks in both orders and returns the student's share of wins
    (0, 0.5 or 1). The API key is read from the environment variable named by `api_key_env`; it is sent only to
    `base_url`.
    """

    def __init__(self, model: str, *, base_url: str = "https://api.openai.com/v1",
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0):
        self.model, self.base_url, self.timeout = model, base_url.rstrip("/"), timeout
        self.api_key = os.environ.get(api_key_env)
        if not self.api_key:
            raise ConfigError(f"the API judge needs an API key in ${api_key_env}")

    def _ask(self, prompt: str, a: str, b: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 1, "messages": [
            {"role": "user", "content": JUDGE_TEMPLATE.format(prompt=prompt, a=a, b=b)}]}).encode()
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            reply = json.loads(r.read())
        return str(reply["choices"][0]["message"]["content"]).strip()[:1].upper()

    def preference(self, prompt: str, student: str, reference: str) -> float:
        first = self._ask(prompt, student, reference) == "A"
        second = self._ask(prompt, reference, student) == "B"
        return (first + second) / 2
