"""Where training examples come from: Hugging Face datasets, local json/jsonl/parquet files, and the offline
source — prompts built here from templates × topics, answered by the teacher once and stored as token ids.
A disjoint set of templates and topics (`heldout_prompts`) is kept out of training for evaluation.

Every loader returns an indexable sequence of plain dicts in one of three normalised forms, which
`data/pipeline.py` tokenises:
- chat:   {"messages": [{"role", "content"}, ...]}
- pairs:  {"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}
          or, pre-tokenised, {"prompt_ids", "chosen_ids", "rejected_ids"}
- tokens: {"tokens": [ids], "loss_mask": [0/1]}

DPO pairs of the offline source: chosen = the teacher's own sampled answer; rejected = that answer corrupted
(`corrupt_answer`: its first third kept, the rest shuffled and cut short). The teacher itself prefers the chosen
one by construction (shuffled text is far less likely under it), no second generation pass is needed, and the
pairs teach the cheap, honest signal available without a reward model: fluent, complete answers over broken ones.
`rejected="resample"` instead samples a second answer at a high temperature (a degraded sample), at the cost of
another generation pass.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mamba_llama_jax.errors import DataError

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ROLES = {"system", "user", "assistant"}


# ----------------------------------------------------------------------------------------------- file loading


def _local_files(path: Path) -> tuple[str, list[str]]:
    """The `datasets` builder name and the data files of a local file or directory."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        if any(p.suffix == ".parquet" for p in files):  # a parquet dataset dir; its json files are metadata
            files = [p for p in files if p.suffix == ".parquet"]
    if not files:
        raise DataError(f"no .json, .jsonl or .parquet files in {path}")
    kinds = {LOCAL_SUFFIXES.get(p.suffix) for p in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"{path}: expected only .json/.jsonl or only .parquet files, got "
                        f"{sorted(p.name for p in files)}")
    return kinds.pop(), [str(p) for p in files]


def load_table(source: str, split: str = "train") -> Any:
    """A `datasets.Dataset` from a local file/directory, or from the Hugging Face hub when `source` is not a path;
    a token corpus (`.npz` files, `write_token_corpus`) is read directly, without `datasets`."""
    p = Path(source).expanduser()
    if p.suffix == ".npz" or (p.is_dir() and any(p.glob("*.npz"))):
        if not p.exists():
            raise DataError(f"dataset file not found: {source}")
        return TokenCorpus(p)
    import datasets

    try:
        if p.exists():
            builder, files = _local_files(p)
            return datasets.load_dataset(builder, data_files=files, split="train")
        if source.startswith((".", "/", "~")) or Path(source).suffix in LOCAL_SUFFIXES:
            raise DataError(f"dataset file not found: {source}")
        return datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFound, DatasetNotFound, ArrowInvalid, ...)
        raise DataError(f"cannot load dataset {source!r} (split {split!r}): {e}") from e


class TokenCorpus:
    """Rows {tokens, loss_mask} of a token corpus: one `.npz` file or every `.npz` file of a directory (sorted by
    name), each holding `tokens` (uint16/int32 ids, all rows concatenated), `offsets` (row starts, n+1) and
    `prompt_lens` (the leading tokens of each row that carry no loss). Compact enough to carry a few million
    tokens between machines (uint16: 2 bytes a token, compressed), and read without `datasets`."""

    def __init__(self, path: str | Path):
        p = Path(path)
        # A *.tmp.npz is a write that a killed run left half done (write_token_corpus renames it when whole).
        files = [p] if p.is_file() else sorted(f for f in p.glob("*.npz") if not f.name.endswith(".tmp.npz"))
        if not files:
            raise DataError(f"no .npz token corpus files in {p}")
        self.parts = []
        for f in files:
            try:
                z = np.load(f)
                toks, off, plens = z["tokens"], z["offsets"].astype(np.int64), z["prompt_lens"].astype(np.int64)
            except (OSError, ValueError, KeyError) as e:
                raise DataError(f"{f}: not a token corpus (.npz with tokens, offsets, prompt_lens): {e}") from None
            if off.ndim != 1 or len(off) != len(plens) + 1 or off[0] != 0 or off[-1] != len(toks) \
                    or np.any(np.diff(off) < 0) or np.any(plens > np.diff(off)):
                raise DataError(f"{f}: inconsistent token corpus (offsets/prompt_lens do not fit {len(toks)} tokens)")
            self.parts.append((toks, off, plens))
        self.starts = np.cumsum([0] + [len(pl) for _, _, pl in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        toks, off, plens = self.parts[k]
        j = i - int(self.starts[k])
        row = toks[off[j]:off[j + 1]].astype(np.int64).tolist()
        n = int(plens[j])
        return {"tokens": row, "loss_mask": [0] * n + [1] * (len(row) - n)}


def write_token_corpus(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Writes rows {tokens, loss_mask (0s then 1s)} as a compressed `.npz` token corpus (`TokenCorpus`), ids as
    uint16 when the vocabulary allows; atomic (a temp file renamed into place)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise DataError(f"a token corpus file must end in .npz, got {path}")
    toks = [list(r["tokens"]) for r in rows]
    plens = []
    for i, r in enumerate(rows):
        m = list(r["loss_mask"])
        n = m.index(1) if 1 in m else len(m)
        if len(m) != len(toks[i]) or any(x != 1 for x in m[n:]):
            raise DataError(f"row {i}: a token corpus stores loss masks of the form 0…0 1…1 (prompt, answer)")
        plens.append(n)
    top = max((max(t) for t in toks if t), default=0)
    flat = np.concatenate([np.asarray(t, np.int64) for t in toks]) if toks else np.zeros(0, np.int64)
    flat = flat.astype(np.uint16 if top < 2 ** 16 else np.int32)
    offsets = np.cumsum([0] + [len(t) for t in toks]).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, tokens=flat, offsets=offsets, prompt_lens=np.asarray(plens, np.int32))
    os.replace(tmp, path)
    return path


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if (not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str)
                or m["role"] not in ROLES):
            raise DataError(f"{where}[{i}]: each message needs a role in {sorted(ROLES)} and a string content, "
                            f"got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def normalize_chat(row: dict[str, Any], where: str = "example") -> dict[str, Any]:
    """{"messages": [...]} from a row with a `messages` column (UltraChat's layout)."""
    if "messages" not in row:
        raise DataError(f"{where}: a chat dataset needs a `messages` column, got columns {sorted(row)}")
    msgs = _messages(row["messages"], f"{where}.messages")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    return {"messages": msgs}


def normalize_pair(row: dict[str, Any], where: str = "example") -> dict[str, Any]:
    """{"prompt", "chosen", "rejected"} from `chosen`/`rejected` columns: message lists sharing a prompt (as in
    UltraFeedback-binarized) or strings with a `prompt` column."""
    if "chosen" not in row or "rejected" not in row:
        raise DataError(f"{where}: a preference dataset needs `chosen` and `rejected` columns, got {sorted(row)}")
    c, r = row["chosen"], row["rejected"]
    if isinstance(c, str) and isinstance(r, str):
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise DataError(f"{where}: string `chosen`/`rejected` need a string `prompt` column")
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}]}
    c, r = _messages(c, f"{where}.chosen"), _messages(r, f"{where}.rejected")
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n] and c[n]["role"] != "assistant":
        n += 1
    if n == 0 or n == len(c) or n == len(r):
        raise DataError(f"{where}: chosen and rejected must share a prompt (the leading non-assistant messages) "
                        "and each continue it with an answer")
    return {"prompt": c[:n], "chosen": c[n:], "rejected": r[n:]}


def _ids(value: Any, where: str, what: str) -> list[int]:
    """A list of non-negative integer ids (numpy integers included: parquet columns give them)."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise DataError(f"{where}: `{what}` must be a list of integers, got {type(value).__name__}")
    out = list(value)
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0 for t in out):
        bad = next(t for t in out if not (isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0))
        raise DataError(f"{where}: `{what}` must hold non-negative integers, got {bad!r}")
    return [int(t) for t in out]


def _mask(value: Any, n: int, where: str, what: str) -> list[int]:
    if value is None:
        return [1] * n
    mask = _ids(value, where, what)
    if len(mask) != n:
        raise DataError(f"{where}: `{what}` has {len(mask)} entries for {n} tokens")
    if any(m > 1 for m in mask):
        raise DataError(f"{where}: `{what}` must hold 0 or 1")
    return mask


def normalize_tokens(row: dict[str, Any], where: str = "example") -> dict[str, Any]:
    if "tokens" not in row:
        raise DataError(f"{where}: a pre-tokenised dataset needs a `tokens` column, got {sorted(map(str, row))}")
    toks = _ids(row["tokens"], where, "tokens")
    return {"tokens": toks, "loss_mask": _mask(row.get("loss_mask"), len(toks), where, "loss_mask")}


def normalize_offline_pair(row: dict[str, Any], where: str = "example") -> dict[str, Any]:
    """A pre-tokenised pair of the offline source: `prompt_ids`, `tokens` and `rejected_tokens` (both prompt +
    answer)."""
    for col in ("prompt_ids", "tokens", "rejected_tokens"):
        if col not in row:
            raise DataError(f"{where}: an offline preference row needs `{col}`, got columns {sorted(map(str, row))}")
    p = _ids(row["prompt_ids"], where, "prompt_ids")
    chosen, rejected = _ids(row["tokens"], where, "tokens"), _ids(row["rejected_tokens"], where, "rejected_tokens")
    if chosen[:len(p)] != p or rejected[:len(p)] != p:
        raise DataError(f"{where}: `tokens` and `rejected_tokens` must start with `prompt_ids`")
    return {"prompt_ids": p, "chosen_ids": chosen[len(p):], "rejected_ids": rejected[len(p):]}


class Examples:
    """A lazily normalised, indexable view of a table: what grain's `MapDataset.source` reads."""

    def __init__(self, table: Any, kind: str, max_examples: int = 0):
        self.table, self.kind = table, kind
        self.n = len(table) if not max_examples else min(len(table), max_examples)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.table[int(i)]
        where = f"example {int(i)}"
        if self.kind == "chat":
            if "tokens" in row:
                return normalize_tokens(row, where)
            return normalize_chat(row, where)
        if self.kind == "pairs":
            if "rejected_tokens" in row:  # the offline source
                return normalize_offline_pair(row, where)
            return normalize_pair(row, where)
        return normalize_tokens(row, where)


def load_examples(source: str, kind: str, *, split: str = "train", max_examples: int = 0) -> Examples:
    """A stage's examples, validated on the first row so that a wrong column fails now rather than mid-run."""
    table = load_table(source, split)
    if isinstance(table, TokenCorpus) and kind == "pairs":
        raise DataError(f"{source}: a token corpus (.npz) holds answers only, not the chosen/rejected pairs DPO "
                        "needs; use a `gen-labels` directory or a preference dataset")
    ex = Examples(table, kind, max_examples)
    if len(ex) == 0:
        raise DataError(f"dataset {source!r} is empty")
    ex[0]
    return ex


# ------------------------------------------------------------------------------------------- the offline source


TEMPLATES = (
    "Explain {topic} to a curious twelve-year-old.",
    "Give three surprising facts about {topic}.",
    "Write a short poem about {topic}.",
    "What are the main advantages and disadvantages of {topic}?",
    "Summarise the history of {topic} in a few sentences.",
    "How would you teach a beginner about {topic}? Give a step-by-step plan.",
    "Write a friendly email inviting a colleague to a talk on {topic}.",
    "List common misconceptions about {topic} and correct them.",
    "Describe {topic} using an everyday analogy.",
    "What questions would an expert ask about {topic}?",
    "Write a two-paragraph story in which {topic} plays a key role.",
    "Compare {topic} with something similar and explain the difference.",
)

TOPICS = (
    "photosynthesis", "black holes", "the water cycle", "volcanoes", "honey bees", "the printing press",
    "machine learning", "prime numbers", "the Roman Empire", "climate change", "vaccines", "the internet",
    "electric cars", "coffee", "chess", "the human heart", "rainbows", "tides", "recycling", "jazz music",
    "the Moon landing", "DNA", "earthquakes", "bicycles", "compound interest", "sleep", "the Great Wall of China",
    "solar panels", "octopuses", "democracy", "gravity", "bread baking", "the Olympic Games", "magnets",
    "rain forests", "the periodic table", "writing a CV", "learning a language", "time zones", "penguins",
)


# Held out whole from training: `offline_prompts` never uses these templates or topics, so `heldout_prompts`
# (held-out templates × held-out topics) measures generalisation to new prompt *families*, not new samples of the
# training distribution. Evaluation only (eval/perplexity.py's `heldout` corpus); never add them to training.
HELDOUT_TEMPLATES = (
    "Write a short dialogue between two friends arguing about {topic}.",
    "What would a newspaper headline about {topic} look like in the year 2100? Explain it.",
    "Give a one-paragraph beginner's glossary of the key terms around {topic}.",
    "Plan a one-day school field trip themed on {topic}.",
    "Write a product review, good or bad, of something related to {topic}.",
)

HELDOUT_TOPICS = (
    "glaciers", "the violin", "medieval castles", "origami", "submarines", "the immune system", "kites",
    "lighthouses", "the stock market", "tea ceremonies", "wind turbines", "spiders",
)


# A second axis for the bigger corpora (`benchmarks/bench_quality.py corpus`): more topics and answer styles. The
# first len(TEMPLATES)·len(TOPICS) prompts of `offline_prompts` stay exactly what they were without it, so small
# runs (the demo, the tests) see the same data as before.
MORE_TOPICS = (
    "bridges", "the Renaissance", "antibiotics", "coral reefs", "overfishing", "pyramids",
    "robots", "vitamins", "thunderstorms", "the French Revolution", "rockets", "mushrooms", "batteries",
    "the Silk Road", "photography", "the human brain", "deserts", "trains", "chocolate", "the Pythagorean theorem",
    "elephants", "public libraries", "3D printing", "the Amazon river", "earth's atmosphere", "dinosaurs",
    "composting", "the piano", "renewable energy", "ancient Egypt", "smartphones", "bees' dances", "cheese making",
    "the speed of light", "volunteering", "marathons", "whales", "cloud computing", "the Industrial Revolution",
    "hurricanes", "fractions", "gardening", "the solar system", "sourdough", "the Eiffel Tower", "microscopes",
    "friendship", "budgeting", "owls", "nuclear fusion", "sailing", "maps", "paper", "snow",
    "the metric system", "podcasts", "cats", "airplanes", "first aid", "board games",
)

STYLES = (
    "",
    " Keep the answer under 80 words.",
    " Use a numbered list.",
    " Write it for a university student.",
    " End with a one-sentence summary.",
    " Use simple words only.",
    " Include one concrete example.",
    " Answer in a cheerful tone.",
)


def _all_offline_prompts(seed: int) -> list[str]:
    base = [t.format(topic=topic) for t in TEMPLATES for topic in TOPICS]
    random.Random(seed).shuffle(base)
    seen = set(base)
    more = [t.format(topic=topic) + style for style in STYLES for t in TEMPLATES for topic in TOPICS + MORE_TOPICS]
    more = [m for m in more if m not in seen]
    random.Random(seed + 1).shuffle(more)
    return base + more


def offline_prompt_count() -> int:
    """How many distinct prompts `offline_prompts` can give."""
    return len(TEMPLATES) * len(TOPICS + MORE_TOPICS) * len(STYLES)


def offline_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct prompts (templates × topics × answer styles, shuffled by `seed`; the plain templates × TOPICS
    come first). Never draws from the held-out families (`heldout_prompts`)."""
    total = offline_prompt_count()
    if n > total:
        raise DataError(f"the offline source has {total} distinct prompts; asked for {n}")
    return _all_offline_prompts(seed)[:n]


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct evaluation prompts from HELDOUT_TEMPLATES × HELDOUT_TOPICS (shuffled by `seed`): no template
    and no topic of them occurs in `offline_prompts`."""
    allp = [t.format(topic=topic) for t in HELDOUT_TEMPLATES for topic in HELDOUT_TOPICS]
    if n > len(allp):
        raise DataError(f"the held-out source has {len(allp)} distinct prompts; asked for {n}")
    random.Random(seed).shuffle(allp)
    return allp[:n]


def corrupt_answer(ids: Sequence[int], rng: np.random.Generator) -> list[int]:
    """A dispreferred answer: the first third kept, the rest shuffled, cut to 50–100 % of the original length."""
    ids = list(ids)
    if len(ids) < 3:
        return ids[:1] if ids else []
    keep = len(ids) // 3
    rest = ids[keep:]
    rng.shuffle(rest)
    out = ids[:keep] + rest
    return out[: max(1, int(len(out) * rng.uniform(0.5, 1.0)))]


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    """Atomic write: a temp file renamed into place, so a killed run never leaves a half part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: [r[k] for r in rows] for k in rows[0]}
    table = pa.table({k: pa.array(v, type=pa.list_(pa.int32()) if isinstance(v[0], list) else None)
                      for k, v in cols.items()})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def answer_batch(gen: Any, tokenizer: Any, prompts: Sequence[str], sampling: Any, rng: np.random.Generator,
                 rejected: str = "shuffle") -> list[dict[str, Any]]:
    """The teacher's answers to one batch of prompts as offline rows: prompt_ids, tokens (prompt + answer +
    end-of-turn when it finished), loss_mask (answer only), rejected_tokens, rejected_loss_mask. `gen`: a
    `Generator` of the teacher; `rng` draws the corrupted (rejected) answers."""
    from mamba_llama_jax.inference.generate import SamplingConfig

    if rejected not in ("shuffle", "resample"):
        raise DataError(f"rejected must be 'shuffle' or 'resample', got {rejected!r}")
    eos = list(tokenizer.eos_token_ids)
    end = [eos[0]] if eos else []
    pids = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    res = gen.run(pids, sampling, eos_ids=eos)
    answers = res.ids()
    finished = [n < sampling.max_new_tokens for n in res.lengths]
    if rejected == "resample":
        hot = SamplingConfig(temperature=1.5, seed=sampling.seed + 1, max_new_tokens=sampling.max_new_tokens)
        bad = gen.run(pids, hot, eos_ids=eos).ids()
    else:
        bad = [corrupt_answer(a, rng) for a in answers]
    rows = []
    for p, a, done, r in zip(pids, answers, finished, bad):
        a = a + (end if done else [])
        rows.append({"prompt_ids": p, "tokens": p + a, "loss_mask": [0] * len(p) + [1] * len(a),
                     "rejected_tokens": p + r + end, "rejected_loss_mask": [0] * len(p) + [1] * (len(r) + len(end))})
    return rows


def generate_offline(model: Any, tokenizer: Any, out_dir: str | Path, *, num_prompts: int = 256,
                     max_new_tokens: int = 128, batch_size: int = 16, temperature: float = 0.7, top_p: float = 0.95,
                     seed: int = 0, rejected: str = "shuffle", shard_index: int = 0, shard_count: int = 1,
                     prompts: Sequence[str] | None = None) -> Path:
    """The teacher's answers to the offline prompts (or `prompts`), written as parquet parts of token ids
    (`answer_batch` rows). Batched with the fast `Generator`; host `shard_index` of `shard_count` answers prompts
    i ≡ shard_index (mod shard_count); parts already on disk are skipped, so a killed run resumes where it stopped.
    """
    from mamba_llama_jax.inference.generate import Generator, SamplingConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(prompts) if prompts is not None else offline_prompts(num_prompts, seed)
    mine = [p for i, p in enumerate(texts) if i % shard_count == shard_index]
    gen: Generator | None = None
    for b in range(0, len(mine), batch_size):
        part = out / f"part-{shard_index:03d}-{b // batch_size:05d}.parquet"
        if part.exists():
            continue
        gen = gen or Generator(model, pad_id=tokenizer.pad_token_id)
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed * 100003 + b,
                                  max_new_tokens=max_new_tokens)
        rows = answer_batch(gen, tokenizer, mine[b:b + batch_size], sampling,
                            np.random.default_rng([seed, shard_index, b]), rejected)
        _write_parquet(part, rows)
    meta = {"num_prompts": len(texts), "max_new_tokens": max_new_tokens, "temperature": temperature,
            "top_p": top_p, "seed": seed, "rejected": rejected, "shard_count": shard_count}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "meta.json")
    return out
