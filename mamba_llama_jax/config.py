"""Frozen-dataclass configs with strict loading: unknown keys are rejected and values type-checked."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mamba_llama_jax.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `llama3` is Llama 3.1+'s band-wise scheme; `linear` divides every frequency."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("llama3", "linear"):
            raise ConfigError(
                f"unknown rope_scaling type {self.rope_type!r}: supported are 'llama3' and 'linear' "
                "(or no rope_scaling for plain theta)"
            )
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder (Llama 2/3/3.1/3.2, SmolLM2, Mistral without sliding window)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Runtime choices, not architecture: bf16 compute with fp32 master weights by default.
    dtype: str = "bfloat16"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")


DTYPES = {"float32", "bfloat16", "float16"}

SCAN_IMPLS = ("sequential", "associative", "chunked", "kernel")  # kernel: pallas_kernels.dispatch picks


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """The Mamba mixers that replace attention layers (DESIGN.md, "Attention → Mamba"); defaults are the official.

    0 means "derive from the teacher": d_inner = num_heads·head_dim, d_xb = num_kv_heads·head_dim, d_state =
    head_dim (mamba2) or 16 (mamba1), dt_rank = ceil(hidden/16) (mamba1). `scan` picks the reference op for full
    sequences; Mamba1 has no chunked form, so 'chunked' runs its sequential scan. 'kernel' goes through
    `pallas_kernels.dispatch` (the Pallas kernel where it is allowed, the reference elsewhere).
    """

    variant: str = "mamba2"
    d_state: int = 0
    d_conv: int = 4
    d_inner: int = 0
    d_xb: int = 0
    dt_rank: int = 0
    chunk_size: int = 256
    scan: str = "chunked"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, ...] = (1.0, 16.0)
    conv_bias: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.variant not in ("mamba1", "mamba2"):
            raise ConfigError(f"mamba.variant must be 'mamba1' or 'mamba2', got {self.variant!r}")
        if self.scan not in SCAN_IMPLS:
            raise ConfigError(f"mamba.scan must be one of {list(SCAN_IMPLS)}, got {self.scan!r}")
        for name in ("d_state", "d_inner", "d_xb", "dt_rank"):
            if getattr(self, name) < 0:
                raise ConfigError(f"mamba.{name} must be >= 0 (0: derive from the teacher), got {getattr(self, name)}")
        for name in ("d_conv", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"mamba.{name} must be a positive integer, got {getattr(self, name)}")
        if not 0 < self.dt_min <= self.dt_max or self.dt_init_floor < 0:
            raise ConfigError(
                f"mamba dt init needs 0 < dt_min <= dt_max and dt_init_floor >= 0, got dt_min={self.dt_min}, "
                f"dt_max={self.dt_max}, dt_init_floor={self.dt_init_floor}")
        if len(self.A_init_range) != 2 or not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ConfigError(f"mamba.A_init_range must be [low, high] with 0 < low <= high, got "
                              f"{list(self.A_init_range)}")


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    """Which layers keep attention, and the Mamba mixer that replaces the others.

    Give either `attn_layers` (explicit indices, the exported form) or `attn_fraction` (layer i keeps attention
    iff i % k == k - 1, k = 1/fraction; 0 means no attention at all). `attn_layers` wins when both are given.

    `keep_layers`: a shallower student (e.g. a speculative-decoding draft) built from only these teacher layers,
    in this order (distinct, ascending, non-empty); `attn_layers`/`attn_fraction` then index the kept layers
    (0..len-1). None: every teacher layer. The student itself does not remember which teacher layers it came
    from: `student_layout` is the layout it exports (no keep_layers, explicit attn_layers).
    """

    attn_layers: tuple[int, ...] | None = None
    attn_fraction: float | None = None
    mamba: MambaConfig = MambaConfig()
    keep_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.attn_layers is None and self.attn_fraction is None:
            raise ConfigError("hybrid config needs `attn_layers` (a list of layer indices) or `attn_fraction` "
                              "(e.g. 0.5, 0.25, 0.125 or 0)")
        if self.attn_layers is not None:
            if any(i < 0 for i in self.attn_layers) or len(set(self.attn_layers)) != len(self.attn_layers):
                raise ConfigError(f"attn_layers must be distinct non-negative indices, got {list(self.attn_layers)}")
            object.__setattr__(self, "attn_layers", tuple(sorted(self.attn_layers)))
        if self.keep_layers is not None:
            keep = list(self.keep_layers)
            if not keep:
                raise ConfigError("keep_layers must name at least one teacher layer (leave it out to keep them all)")
            # ascending, not sorted for the user: a reordered stack is almost surely a typo, not a wish
            if any(i < 0 for i in keep) or any(a >= b for a, b in zip(keep, keep[1:])):
                raise ConfigError(f"keep_layers must be distinct non-negative teacher layer indices in ascending "
                                  f"order, got {keep}")
            bad = [i for i in self.attn_layers or () if i >= len(keep)]
            if bad:
                raise ConfigError(f"attn_layers {bad} out of range: with keep_layers they index the {len(keep)} kept "
                                  f"layers (0..{len(keep) - 1}), not the teacher's")
        if self.attn_fraction is not None:
            f = self.attn_fraction
            if not 0 <= f <= 1 or (f > 0 and abs(1 / f - round(1 / f)) > 1e-6):
                raise ConfigError(f"attn_fraction must be 0 or 1/k for an integer k (1, 0.5, 0.25, 0.125, ...), "
                                  f"got {f}")

    def layers_for(self, num_layers: int) -> tuple[int, ...]:
        """The attention layer indices for a model of `num_layers` layers (validated against it); with
        keep_layers, that model is the shallow student (len(keep_layers) layers)."""
        if self.keep_layers is not None and num_layers != len(self.keep_layers):
            raise ConfigError(f"this layout keeps {len(self.keep_layers)} teacher layers (keep_layers "
                              f"{list(self.keep_layers)}): its attention layers index a model of that many layers, "
                              f"not of {num_layers} (use kept_layers/student_layout with the teacher's count)")
        if self.attn_layers is not None:
            bad = [i for i in self.attn_layers if i >= num_layers]
            if bad:
                raise ConfigError(f"attn_layers {bad} out of range for a model with {num_layers} layers")
            return self.attn_layers
        f = float(self.attn_fraction)  # type: ignore[arg-type]
        if f == 0:
            return ()
        k = round(1 / f)
        return tuple(i for i in range(num_layers) if i % k == k - 1)

    def kept_layers(self, teacher_layers: int) -> tuple[int, ...]:
        """The teacher layers the student is built from, in order (keep_layers validated against the teacher's
        `teacher_layers`, or all of them)."""
        if self.keep_layers is None:
            return tuple(range(teacher_layers))
        bad = [i for i in self.keep_layers if i >= teacher_layers]
        if bad:
            raise ConfigError(f"keep_layers {bad} out of range for a teacher with {teacher_layers} layers "
                              f"(valid: 0..{teacher_layers - 1})")
        return self.keep_layers

    def student_layout(self, teacher_layers: int) -> HybridConfig:
        """This layout as the student built from a `teacher_layers`-layer teacher sees it: keep_layers resolved
        away (the student simply has that many layers) and the attention layers explicit, as it is exported."""
        n = len(self.kept_layers(teacher_layers))
        return dataclasses.replace(self, keep_layers=None, attn_layers=self.layers_for(n), attn_fraction=None)


# ------------------------------------------------------------------------------------------------ training


OBJECTIVES = ("distill", "dpo", "hidden", "orient")
TRAINABLE = ("mamba", "all")
LOSS_NORMALIZATIONS = ("token_mean", "sequence_sum")
DATA_KINDS = ("chat", "pairs", "tokens")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where a stage's examples come from and how they are shaped.

    source: a local .json/.jsonl/.parquet file or directory of them, a directory written by
    `data.sources.generate_offline` (kind 'tokens'), a token corpus (.npz file or directory of them,
    `data.sources.write_token_corpus`), or a Hugging Face hub dataset name. kind: 'chat' (a
    `messages` column), 'pairs' (`chosen`/`rejected`, for DPO) or 'tokens' (pre-tokenised `tokens`/`loss_mask`).
    """

    source: str
    kind: str = "chat"
    split: str = "train"
    seq_len: int = 2048
    pack: bool = True
    shuffle_seed: int = 0
    num_epochs: int = 1  # 0: repeat forever (the stage's `steps` ends it)
    max_examples: int = 0  # 0: all
    max_prompt_len: int = 512  # pairs only: prompts are cut (from the left) to this many tokens
    num_packing_bins: int = 16

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"data.kind must be one of {list(DATA_KINDS)}, got {self.kind!r}")
        for name in ("seq_len", "num_packing_bins"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("num_epochs", "max_examples", "max_prompt_len"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.kind == "pairs" and self.max_prompt_len >= self.seq_len:
            raise ConfigError(f"data.max_prompt_len ({self.max_prompt_len}) must be below data.seq_len "
                              f"({self.seq_len}) so that responses keep some room")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine (or constant) decay, global-norm clipping. Defaults: the official
    layer-wise stage (lr 8e-5, betas (0.9, 0.98), clip 0.1)."""

    lr: float = 8e-5
    schedule: str = "cosine"
    warmup_steps: int = 0
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.1  # 0: off

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"optim.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("optim: lr must be > 0 and warmup_steps, grad_clip, weight_decay >= 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and 0 <= self.end_lr_ratio <= 1):
            raise ConfigError("optim: b1, b2 must be in [0, 1) and end_lr_ratio in [0, 1]")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights and normalisations of a stage's loss (see `train/losses.py`). Defaults: the official layer-wise
    stage, CE (per-token mean) + 0.1·KL with `batchmean` (= 'sequence_sum': summed over positions, / B)."""

    ce_weight: float = 1.0
    kl_weight: float = 0.1
    temperature: float = 1.0
    ce_normalization: str = "token_mean"
    kl_normalization: str = "sequence_sum"
    dpo_beta: float = 0.01

    def __post_init__(self) -> None:
        for name in ("ce_normalization", "kl_normalization"):
            if getattr(self, name) not in LOSS_NORMALIZATIONS:
                raise ConfigError(f"loss.{name} must be one of {list(LOSS_NORMALIZATIONS)}, "
                                  f"got {getattr(self, name)!r}")
        if self.temperature <= 0 or self.dpo_beta <= 0 or self.ce_weight < 0 or self.kl_weight < 0:
            raise ConfigError("loss: temperature and dpo_beta must be > 0, weights >= 0")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage of a recipe: an objective over the shared step function.

    objective: 'distill' (CE/KL against the teacher: layer-wise, end-to-end, SFT), 'dpo' (against a frozen copy
    of the student at the stage's start), 'hidden' (MOHAWK hidden-state alignment: each Mamba mixer matches the
    teacher's attention output on the teacher's own layer input), 'orient' (MOHAWK matrix orientation: each
    Mamba2 mixer's SSD matrix matches the teacher's attention matrix on that input; short sequences).
    train: 'mamba' (only Mamba mixers) or 'all'.
    hybrid: this stage's layout; a stage whose layout has fewer attention layers than the previous one converts
    the new Mamba layers from the previous stage's attention weights (progressive conversion). None: the
    recipe's `hybrid`, or the previous stage's. skip_nonfinite: how many batches whose loss or gradient is NaN/inf
    may be skipped (parameters and optimizer state left as they were) before the stage stops; 0 stops at the first.
    """

    name: str
    data: DataConfig
    objective: str = "distill"
    train: str = "mamba"
    steps: int = 100
    batch_size: int = 8  # global, in sequences (pairs for DPO)
    grad_accum: int = 1
    hybrid: HybridConfig | None = None
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    skip_nonfinite: int = 0  # batches with a non-finite loss/gradient skipped (state kept) before stopping; 0: stop
    # Rematerialisation of the student's decoder layers in the backward pass: 'none' keeps every activation,
    # 'full' recomputes each layer from its input, 'dots' saves matmul outputs only (see models/llama.py REMAT).
    remat: str = "none"

    def __post_init__(self) -> None:
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"stage {self.name}: remat must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")
        if self.skip_nonfinite < 0:
            raise ConfigError(f"stage {self.name}: skip_nonfinite must be >= 0, got {self.skip_nonfinite}")
        if not self.name or "/" in self.name:
            raise ConfigError(f"stage name must be a non-empty name without '/', got {self.name!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"stage {self.name}: objective must be one of {list(OBJECTIVES)}, "
                              f"got {self.objective!r}")
        if self.train not in TRAINABLE:
            raise ConfigError(f"stage {self.name}: train must be one of {list(TRAINABLE)}, got {self.train!r}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"stage {self.name}: {name} must be a positive integer, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"stage {self.name}: batch_size ({self.batch_size}) must be a multiple of grad_accum "
                              f"({self.grad_accum})")
        want = "pairs" if self.objective == "dpo" else None
        if want and self.data.kind != want:
            raise ConfigError(f"stage {self.name}: objective 'dpo' needs data.kind 'pairs', got {self.data.kind!r}")
        if self.objective != "dpo" and self.data.kind == "pairs":
            raise ConfigError(f"stage {self.name}: data.kind 'pairs' is only for objective 'dpo'")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp, tensor). -1 in one axis: all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ConfigError(f"mesh sizes must be positive, with at most one -1 (the rest), got {list(sizes)}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # steps between saves (the last step is always saved)
    keep: int = 3
    async_save: bool = True

    def __post_init__(self) -> None:
        if self.every <= 0 or self.keep <= 0:
            raise ConfigError("checkpoint.every and checkpoint.keep must be positive integers")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A recipe: a teacher, a target hybrid layout, and stages run in order, each from the previous one's result.

    teacher: a GGUF file or HF directory (None: the embedded SmolLM2-135M-Instruct). output_dir holds one
    checkpoint directory per stage, metrics.jsonl and loss.png. quiet_start: None for the method's initialisation
    of converted Mamba layers; a scale s in (0, 1] starts each newly converted Mamba2 mixer near "layer removed"
    (identity conv, gated norm weight times s; `convert.from_attention.quiet_start`; 0.05 measured).
    """

    output_dir: str
    stages: tuple[StageConfig, ...]
    hybrid: HybridConfig = HybridConfig(attn_fraction=0.5)
    teacher: str | None = None
    seed: int = 0
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log_every: int = 10
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    quiet_start: float | None = None

    def __post_init__(self) -> None:
        if self.quiet_start is not None and not 0 < self.quiet_start <= 1:
            raise ConfigError(f"quiet_start must be in (0, 1] (or left out), got {self.quiet_start}")
        if not self.stages:
            raise ConfigError("a recipe needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be distinct, got {names}")
        if self.log_every <= 0:
            raise ConfigError(f"log_every must be a positive integer, got {self.log_every}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")


# ----------------------------------------------------------------------------------------------- strict loading


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arm, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: expected {tp}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        # float() of an integer beyond ~1.8e308 raises OverflowError rather than giving inf
        if (isinstance(value, int) and abs(value) > 2 ** 1023) or not math.isfinite(float(value)):
            raise ConfigError(f"{where}: expected a finite number, got {_short_repr(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Builds a frozen config dataclass from a mapping, rejecting unknown keys and ill-typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _check_type(value, hints[name], f"{where + '.' if where else ''}{name}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or cls.__name__}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, ArithmeticError) as e:  # e.g. round(1 / 1e-320) overflows
        raise ConfigError(f"{where or cls.__name__}: invalid value ({type(e).__name__}: {e})") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """The inverse of `from_dict`: nested plain dicts, tuples as lists (yaml/json friendly)."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


MAX_CONFIG_NODES = 100_000  # far above any real recipe; bounds what yaml aliases can expand to
MAX_CONFIG_DEPTH = 64  # real recipes nest 4 deep; json round trips and the type checks recurse


def _short_repr(v: Any) -> str:
    # bit_length, not str(): str() of an int past 4300 digits raises ValueError
    r = repr(v) if not isinstance(v, int) or abs(v) < 10 ** 30 else f"an integer of {v.bit_length()} bits"
    return r if len(r) <= 200 else r[:200] + "..."


def _check_tree(data: Any, source: Any) -> None:
    """Refuses a self-referencing document (a yaml alias inside its own anchor), one that expands to more than
    MAX_CONFIG_NODES values (a "billion laughs" of nested aliases) or nests deeper than MAX_CONFIG_DEPTH."""
    stack: list[tuple[Any, frozenset[int]]] = [(data, frozenset())]
    count = 0
    while stack:
        node, ancestors = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ConfigError(f"config {source} holds more than {MAX_CONFIG_NODES} values (nested yaml aliases?)")
        if isinstance(node, (dict, list)):
            if len(ancestors) >= MAX_CONFIG_DEPTH:
                raise ConfigError(f"config {source} nests deeper than {MAX_CONFIG_DEPTH} levels")
            if id(node) in ancestors:
                raise ConfigError(f"config {source} refers to itself (a yaml alias inside its own anchor)")
            inner = ancestors | {id(node)}
            children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
            stack.extend((c, inner) for c in children)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Reads a yaml or json file into a dict, with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: bad JSON/UTF-8, an int of > 4300 digits
        raise ConfigError(f"cannot parse config file {p}: {str(e)[:300]}") from e
    except RecursionError:
        raise ConfigError(f"cannot parse config file {p}: nested too deeply") from None
    _check_tree(data, p)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies CLI overrides of the form `key.sub=value` (value parsed as yaml) to a nested dict copy."""
    _check_tree(data, "mapping")
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            raise ConfigError(f"override {item[:100]!r}: cannot parse value: {str(e)[:300]}") from e
        _check_tree(value, f"override {item!r}")
        node: Any = out
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):  # recipes hold lists of stages: `stages.0.steps=10`
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {part!r} is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"override {item!r}: {parts[depth - 1]!r} is not a mapping or list")
    return out


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Loads a config dataclass from yaml/json, applying `key.sub=value` overrides first."""
    data = apply_overrides(read_mapping(path), overrides or [])
    return from_dict(cls, data, Path(path).name)
