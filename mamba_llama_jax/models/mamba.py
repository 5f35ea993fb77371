"""Mamba1 and Mamba2 mixers in the MambaInLlama layout (DESIGN.md, "Attention → Mamba").

Both are drop-in mixers for `models.llama.Block`: `mixer(x, ctx, cache) -> (y, cache)`.
- no cache: full-sequence forward (training);
- cache with `ctx.prefill`: full-sequence forward that also returns the final conv window and ssm state;
- cache, no prefill: decode from the cached state (one step, or k steps at once — same outputs as k single steps);
- `multistep(x, ctx, cache)`: k-step decode for speculative verification; returns a `MambaChunk` (the cache after
  the chunk, plus what `advance(n)` needs to rebuild the cache after any n of its tokens; no state per token).
Left padding (`ctx.token_mask` False) leaves both states untouched: its conv inputs are zero and excluded from the
conv window carried in the cache, and its dt is zero (decay 1, no input). Packed documents (`ctx.segment_ids`)
restart the conv window and the ssm state.

Parameters (Linear kernels are (in, out), i.e. the transpose of the official `.weight`; D = hidden size,
H = num_heads, P = head_dim, d_inner = H·P, d_xb = num_kv_heads·P, N = d_state, K = d_conv, R = dt_rank):

Mamba2 (official `Mamba2` in mamba2/hybrid_mamba_layer.py; N = P):
| name            | shape                                  | logical axes             |
|-----------------|----------------------------------------|--------------------------|
| in_proj.kernel  | (D, 2·d_inner + 2·d_xb + H) [z|x|B|C|dt]| (embed, ssm_proj)        |
| conv1d.weight   | (d_inner + 2·d_xb, K)  (torch: (c,1,K)) | (ssm_conv_ch, conv_width)|
| conv1d.bias     | (d_inner + 2·d_xb,)                    | (ssm_conv_ch,)           |
| dt_bias         | (H,)                                   | (ssm_heads,)             |
| A_log           | (H,)                                   | (ssm_heads,)             |
| D               | (H,)                                   | (ssm_heads,)             |
| norm.weight     | (d_inner,)                             | (ssm_inner,)             |
| out_proj.kernel | (d_inner, D)                           | (ssm_inner, embed)       |

Mamba1 (official `Mamba` in mamba/hybrid_mamba_layer.py, training names; the inference format fuses
in_proj = [z|x|B|C|dt_down]):
| name                | shape              | logical axes             |
|---------------------|--------------------|--------------------------|
| in_proj_x.kernel    | (D, d_xb)          | (embed, ssm_xb)          |
| in_proj_z.kernel    | (D, d_inner)       | (embed, ssm_inner)       |
| B_proj.kernel       | (D, d_xb)          | (embed, ssm_xb)          |
| C_proj.kernel       | (D, d_inner)       | (embed, ssm_inner)       |
| dt_proj_down.kernel | (D, R)             | (embed, dt_rank)         |
| dt_proj.kernel      | (R, d_inner)       | (dt_rank, ssm_inner)     |
| dt_proj.bias        | (d_inner,)         | (ssm_inner,)             |
| conv1d.weight       | (d_inner, K)       | (ssm_inner, conv_width)  |
| conv1d.bias         | (d_inner,)         | (ssm_inner,)             |
| A_log               | (d_inner, N)       | (ssm_inner, ssm_state)   |
| D                   | (d_inner,)         | (ssm_inner,)             |
| out_proj.kernel     | (d_inner, D)       | (ssm_inner, embed)       |
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_llama_jax.config import LlamaConfig, MambaConfig
from mamba_llama_jax.errors import ConfigError
from mamba_llama_jax.models.cache import MambaCache, MambaChunk
from mamba_llama_jax.models.llama import Context, Linear, param
from mamba_llama_jax.ops import scan as scan_ops
from mamba_llama_jax.ops import ssd as ssd_ops
from mamba_llama_jax.ops.partials import row_scale
from pallas_kernels import dispatch

F32 = jnp.float32
MULTISTEP_MAX = 16  # decode chunks up to this long use the step-by-step reference, longer ones the configured scan


# ------------------------------------------------------------------------------------------------ initialisers


def uniform(bound: float):
    """U(-bound, bound): PyTorch's default for Linear (bound = 1/sqrt(fan_in)) and Conv1d."""
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return jax.random.uniform(key, shape, F32, -bound, bound).astype(dtype)
    return init


def dt_bias_init(mcfg: MambaConfig):
    """Inverse softplus of dt ~ logU[dt_min, dt_max] floored at dt_init_floor, so softplus(bias) starts there."""
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        lo, hi = math.log(mcfg.dt_min), math.log(mcfg.dt_max)
        dt = jnp.exp(jax.random.uniform(key, shape, F32) * (hi - lo) + lo)
        dt = jnp.maximum(dt, mcfg.dt_init_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    return init


def a_log_init(mcfg: MambaConfig):
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        lo, hi = mcfg.A_init_range
        return jnp.log(jax.random.uniform(key, shape, F32, lo, hi)).astype(dtype)
    return init


def s4d_a_log_init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Mamba1's S4D-real init: A_log[d, n] = log(n + 1)."""
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=F32)), shape).astype(dtype)


def ones(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jnp.ones(shape, dtype)


class UniformLinear(Linear):
    """`Linear` with PyTorch's default init U(±1/sqrt(in)) (or a given bound), as the official fresh weights."""

    def __init__(self, din: int, dout: int, axes: tuple[str | None, str | None], *, dtype: str, param_dtype: str,
                 rngs: nnx.Rngs | None, use_bias: bool = False, bound: float | None = None,
                 bias_init: Any = None):
        super().__init__(din, dout, axes, dtype=dtype, param_dtype=param_dtype, rngs=None, use_bias=use_bias)
        b = 1 / math.sqrt(din) if bound is None else bound
        pdt = jnp.dtype(param_dtype)
        self.kernel = param(rngs, uniform(b), (din, dout), axes, pdt)
        if use_bias:
            self.bias = param(rngs, bias_init or uniform(1 / math.sqrt(din)), (dout,), (axes[1],), pdt)


class Conv1d(nnx.Module):
    """Depthwise causal conv weights, stored (channels, K) (torch's (c, 1, K) with the 1 squeezed)."""

    def __init__(self, channels: int, width: int, axis: str, *, use_bias: bool, param_dtype: str,
                 rngs: nnx.Rngs | None):
        pdt = jnp.dtype(param_dtype)
        bound = 1 / math.sqrt(width)  # PyTorch Conv1d default: fan_in = (in/groups)·K = K
        self.weight = param(rngs, uniform(bound), (channels, width), (axis, "conv_width"), pdt)
        self.bias = param(rngs, uniform(bound), (channels,), (axis,), pdt) if use_bias else None


class GatedNorm(nnx.Module):
    """Holds `norm.weight` of the gated RMSNorm (applied by `gated_rmsnorm`); initialised to ones."""

    def __init__(self, dim: int, *, param_dtype: str):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.dtype(param_dtype)), out_sharding=("ssm_inner",),
                                eager_sharding=False)


# -------------------------------------------------------------------------------------------------- causal conv


def _segment_history(segment_ids: jax.Array | None, b: int, width: int, t: int) -> jax.Array | None:
    """Segment ids of [history (width slots), chunk (t)]; the history belongs to the chunk's first document."""
    if segment_ids is None:
        return None
    return jnp.concatenate([jnp.broadcast_to(segment_ids[:, :1], (b, width)), segment_ids], axis=1)


def causal_conv(u: jax.Array, weight: jax.Array, bias: jax.Array | None, history: jax.Array | None,
                segment_ids: jax.Array | None) -> jax.Array:
    """Depthwise causal conv over time, in fp32. u (b,t,c); weight (c,K); history (b,c,K) the cached window.

    Output t reads inputs t-K+1..t (history before the chunk); taps reaching into an earlier document read zero.
    """
    b, t, c = u.shape
    K = weight.shape[1]
    uf = u.astype(F32)
    prev = jnp.zeros((b, K - 1, c), F32) if history is None else jnp.swapaxes(history[:, :, 1:], 1, 2).astype(F32)
    full = jnp.concatenate([prev, uf], axis=1)  # (b, K-1+t, c)
    segs = _segment_history(segment_ids, b, K - 1, t)
    w = weight.astype(F32)
    out = jnp.zeros((b, t, c), F32) if bias is None else jnp.broadcast_to(bias.astype(F32), (b, t, c))
    for k in range(K):  # K is 4: an unrolled tap sum is clearer than lax.conv and as fast at this width
        tap = full[:, k:k + t]
        if segs is not None:
            tap = tap * (segs[:, k:k + t] == segment_ids)[..., None]
        out = out + tap * w[:, k]
    return out


def conv_window(u: jax.Array, history: jax.Array | None, token_mask: jax.Array,
                segment_ids: jax.Array | None, width: int) -> jax.Array:
    """The conv cache after a chunk: the last `width` *real* inputs of [history, chunk], (b, c, width).

    Padding never enters the window (so a padded decode step leaves it untouched), and entries from before the
    last document of a packed row are zeroed (a new document starts from an empty window).
    """
    b, t, c = u.shape
    hist = jnp.zeros((b, c, width), u.dtype) if history is None else history.astype(u.dtype)
    if t == 1 and segment_ids is None:
        # A decode step: shift in the new input where it is real. Same result as the general path below, without
        # its cumsum / argmax / gather (three kernels per layer per step).
        shifted = jnp.concatenate([hist[:, :, 1:], jnp.swapaxes(u, 1, 2)], axis=2)
        return jnp.where(token_mask.astype(bool)[:, :, None], shifted, hist)
    full = jnp.concatenate([hist, jnp.swapaxes(u, 1, 2)], axis=2)  # (b, c, width + t)
    real = jnp.concatenate([jnp.ones((b, width), bool), token_mask.astype(bool)], axis=1)
    count = jnp.cumsum(real, axis=1, dtype=jnp.int32)  # (b, width + t)
    # slot j holds the (total - width + 1 + j)-th real entry: the first position whose running count reaches it
    rank = count[:, -1:] - width + 1 + jnp.arange(width, dtype=jnp.int32)[None]  # (b, width), >= 1
    idx = jnp.argmax(count[:, None, :] >= rank[:, :, None], axis=-1)  # (b, width)
    win = jnp.take_along_axis(full, jnp.broadcast_to(idx[:, None, :], (b, c, width)), axis=2)
    segs = _segment_history(segment_ids, b, width, t)
    if segs is not None:
        same = jnp.take_along_axis(segs, idx, axis=1) == segment_ids[:, -1:]
        win = win * same[:, None, :].astype(win.dtype)
    return win


def prefix_windows(u: jax.Array, history: jax.Array, width: int) -> jax.Array:
    """(b, k, c, width): the conv window after each prefix of an all-real chunk u (b, k, c)."""
    full = jnp.concatenate([history.astype(u.dtype), jnp.swapaxes(u, 1, 2)], axis=2)  # (b, c, width + k)
    k = u.shape[1]
    return jnp.stack([full[:, :, j + 1:j + 1 + width] for j in range(k)], axis=1)


def repeat_groups(a: jax.Array, size: int, rep: int) -> jax.Array:
    """(..., G·size) -> (..., G·rep·size): each `size`-group repeated `rep` times in place (HF's repeat_kv order)."""
    if rep == 1:
        return a
    shp = a.shape[:-1]
    g = a.shape[-1] // size
    return jnp.repeat(a.reshape(shp + (g, size)), rep, axis=-2).reshape(shp + (g * rep * size,))


def gated_rmsnorm(y: jax.Array, z: jax.Array, weight: jax.Array, group: int, eps: float) -> jax.Array:
    """The official RMSNormGated with norm_before_gate=False: RMSNorm(y ⊙ silu(z)) per group, times weight; fp32."""
    g = y.astype(F32) * jax.nn.silu(z.astype(F32))
    shp = g.shape
    gg = g.reshape(shp[:-1] + (shp[-1] // group, group))
    gg = gg * row_scale(gg, eps)[..., None]
    return gg.reshape(shp) * weight.astype(F32)


def _dims(cfg: LlamaConfig, mcfg: MambaConfig) -> tuple[int, int, int]:
    d_inner = mcfg.d_inner or cfg.num_heads * cfg.head_dim
    d_xb = mcfg.d_xb or cfg.num_kv_heads * cfg.head_dim
    if d_inner % d_xb:
        raise ConfigError(f"mamba d_inner ({d_inner}) must be a multiple of d_xb ({d_xb})")
    d_state = mcfg.d_state or (cfg.head_dim if mcfg.variant == "mamba2" else 16)
    return d_inner, d_xb, d_state


# ------------------------------------------------------------------------------------------------------ Mamba2


def ssd_step(state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
             D: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decode step of the Mamba2 recurrence without a scan (a length-1 `lax.scan` costs a loop per layer
    unless XLA happens to remove it). state (b,h,p,n) fp32; x (b,1,h,p); dt (b,1,h) (softplus applied); B, C
    (b,1,h,n) (already one group per head); A, D (h,) fp32. Same maths as `ops.ssd.ssd_multistep` at k = 1."""
    xf, dtf = x[:, 0].astype(F32), dt[:, 0].astype(F32)
    s = (jnp.exp(dtf * A)[:, :, None, None] * state.astype(F32)
         + (dtf[:, :, None] * xf)[..., None] * B[:, 0].astype(F32)[:, :, None, :])
    y = jnp.einsum("bhpn,bhn->bhp", s, C[:, 0].astype(F32)) + D[None, :, None] * xf
    return y[:, None].astype(x.dtype), s


def mamba_project(zxbcdt: jax.Array, mask: jax.Array, d_inner: int, conv_dim: int,
                  dt_bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """in_proj's output (b, t, d_inner + conv_dim + heads) split and masked: (z, xBC, dt') with
    dt' = softplus(dt + dt_bias) fp32, xBC and dt' zero at padding (mask (b, t)). Columns past the heads' dt are
    ignored (inference copies pad in_proj to the fused GEMVs' tile)."""
    z = zxbcdt[..., :d_inner]
    xbc = jnp.where(mask[..., None], zxbcdt[..., d_inner:d_inner + conv_dim], 0)
    dt = zxbcdt[..., d_inner + conv_dim:d_inner + conv_dim + dt_bias.shape[0]]
    dt = jax.nn.softplus(dt.astype(F32) + dt_bias.astype(F32)) * mask[..., None]
    return z, xbc, dt


def mamba2_decode_reference(zxbcdt: jax.Array, conv: jax.Array, ssm: jax.Array, conv_w: jax.Array,
                            conv_b: jax.Array | None, dt_bias: jax.Array, A: jax.Array, D: jax.Array,
                            norm_w: jax.Array, mask: jax.Array, *, d_inner: int, d_xb: int,
                            eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One Mamba2 decode step between in_proj and out_proj, exactly `Mamba2.__call__`'s at one token (the pure-JAX
    reference of `pallas_kernels.mamba_decode`): zxbcdt (b, d_inner + channels + heads) in_proj's output (columns
    past those ignored, as `mamba_project` ignores them); conv
    (b, channels, d_conv) and ssm (b, h, p, n) fp32 the cache; conv_w (channels, d_conv), conv_b (channels,) or
    None; dt_bias, A (= -exp(A_log)), D (h,); norm_w (d_inner,); mask (b,) whether the token is real (padding
    leaves the cache as it was). Returns (the gated-normed y (b, d_inner) in zxbcdt's dtype, the new conv window,
    the new state)."""
    b = zxbcdt.shape[0]
    n = ssm.shape[-1]
    conv_dim = d_inner + 2 * d_xb
    m = mask.astype(bool)[:, None]  # (b, 1): the decode step's token mask
    z, xbc, dt = mamba_project(zxbcdt[:, None], m, d_inner, conv_dim, dt_bias)
    act = jax.nn.silu(causal_conv(xbc, conv_w, conv_b, conv, None)).astype(xbc.dtype)
    heads, rep = d_inner // n, d_inner // d_xb
    x = repeat_groups(act[..., :d_xb], n, rep).reshape(b, 1, heads, n)
    B = repeat_groups(act[..., d_xb:2 * d_xb], n, rep).reshape(b, 1, heads, n)
    C = act[..., 2 * d_xb:].reshape(b, 1, heads, n)
    y, state = ssd_step(ssm, x, dt, A.astype(F32), B, C, D.astype(F32))
    window = conv_window(xbc, conv, m, None, conv.shape[2]).astype(conv.dtype)
    out = gated_rmsnorm(y.reshape(b, 1, d_inner), z, norm_w, n, eps)
    return out[:, 0].astype(zxbcdt.dtype), window, state


def mamba2_chunk_reference(zxbcdt: jax.Array, conv: jax.Array, ssm: jax.Array, conv_w: jax.Array,
                           conv_b: jax.Array | None, dt_bias: jax.Array, A: jax.Array, D: jax.Array,
                           norm_w: jax.Array, *, d_inner: int, d_xb: int, eps: float) -> tuple[jax.Array, ...]:
    """A verify chunk's t Mamba2 steps between in_proj and out_proj, exactly `Mamba2.multistep_gated`'s (the
    reference of `pallas_kernels.mamba_chunk`; the SSD steps through `dispatch.verify`, pure JAX when the
    references are forced): zxbcdt (b, t, d_inner + channels + heads) in_proj's output for t real tokens (columns
    past those ignored); conv, ssm, conv_w, conv_b, dt_bias, A, D, norm_w as `mamba2_decode_reference`.
    Returns (the gated-normed y (b, t, d_inner) in zxbcdt's dtype, and what `MambaChunk` keeps: the conv inputs
    (b, t, channels) in conv's dtype, x and B after conv + SiLU repeated to the heads (b, t, h, n), dt' (b, t, h)
    fp32, the conv window after the chunk, the state after it (b, h, n, n) fp32)."""
    b, t, _ = zxbcdt.shape
    n = ssm.shape[-1]
    conv_dim = d_inner + 2 * d_xb
    z, xbc, dt = mamba_project(zxbcdt, jnp.ones((b, t), bool), d_inner, conv_dim, dt_bias)
    act = jax.nn.silu(causal_conv(xbc, conv_w, conv_b, conv, None)).astype(xbc.dtype)
    heads, rep = d_inner // n, d_inner // d_xb
    x = repeat_groups(act[..., :d_xb], n, rep).reshape(b, t, heads, n)
    B = repeat_groups(act[..., d_xb:2 * d_xb], n, rep).reshape(b, t, heads, n)
    C = act[..., 2 * d_xb:].reshape(b, t, heads, n)
    y, final = dispatch.verify(ssm, x, dt, A.astype(F32), B, C, D=D.astype(F32), dt_softplus=False,
                               accepted=jnp.full((b,), t, jnp.int32))
    out = gated_rmsnorm(y.reshape(b, t, d_inner), z, norm_w, n, eps).astype(zxbcdt.dtype)
    conv_in = xbc.astype(conv.dtype)
    return out, conv_in, x, dt, B, chunk_window(conv, conv_in), final


class Mamba2(nnx.Module):
    """MambaInLlama's Mamba2 mixer: heads = groups = num_heads, head size = d_state = head_dim, expand 1."""

    def __init__(self, cfg: LlamaConfig, mcfg: MambaConfig, *, rngs: nnx.Rngs | None):
        d = cfg.hidden_size
        self.d_inner, self.d_xb, self.d_state = _dims(cfg, mcfg)
        if self.d_inner % self.d_state or self.d_xb % self.d_state:
            raise ConfigError(f"mamba2 d_state ({self.d_state}) must divide d_inner ({self.d_inner}) and d_xb "
                              f"({self.d_xb}): the head size is d_state")
        self.nheads = self.d_inner // self.d_state
        self.headdim = self.d_state
        self.mcfg, self.dtype = mcfg, cfg.dtype
        self.conv_dim = self.d_inner + 2 * self.d_xb
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.in_proj = UniformLinear(d, self.d_inner + self.conv_dim + self.nheads, ("embed", "ssm_proj"), **kw)
        self.conv1d = Conv1d(self.conv_dim, mcfg.d_conv, "ssm_conv_ch", use_bias=mcfg.conv_bias,
                             param_dtype=cfg.param_dtype, rngs=rngs)
        pdt = jnp.dtype(cfg.param_dtype)
        self.dt_bias = param(rngs, dt_bias_init(mcfg), (self.nheads,), ("ssm_heads",), pdt)
        self.A_log = param(rngs, a_log_init(mcfg), (self.nheads,), ("ssm_heads",), pdt)
        self.D = param(rngs, ones, (self.nheads,), ("ssm_heads",), pdt)
        self.norm = GatedNorm(self.d_inner, param_dtype=cfg.param_dtype)
        self.out_proj = UniformLinear(self.d_inner, d, ("ssm_inner", "embed"), **kw)

    def init_cache(self, batch: int, slots: int) -> MambaCache:
        del slots  # constant-size state
        return MambaCache.allocate(batch, self.conv_dim, self.mcfg.d_conv,
                                   (self.nheads, self.headdim, self.d_state), jnp.dtype(self.dtype))

    def _in(self, x: jax.Array) -> jax.Array:
        return self.in_proj(x)

    def _out_proj(self, y: jax.Array) -> jax.Array:
        return self.out_proj(y)

    def _project(self, x: jax.Array, ctx: Context):
        """in_proj, masked: (z, xBC, dt') with dt' = softplus(dt + dt_bias) fp32, zero at padding."""
        return mamba_project(self._in(x), ctx.token_mask, self.d_inner, self.conv_dim, self.dt_bias[...])

    def _heads(self, xbc_act: jax.Array):
        """Split the conv output into per-head x, B (GQA-repeated) and C: (b,t,H,P), (b,t,H,N), (b,t,H,N)."""
        b, t, _ = xbc_act.shape
        rep = self.d_inner // self.d_xb
        x = repeat_groups(xbc_act[..., :self.d_xb], self.d_state, rep).reshape(b, t, self.nheads, self.headdim)
        B = repeat_groups(xbc_act[..., self.d_xb:2 * self.d_xb], self.d_state, rep).reshape(b, t, self.nheads, -1)
        C = xbc_act[..., 2 * self.d_xb:].reshape(b, t, self.nheads, self.d_state)
        return x, B, C

    def _out(self, y: jax.Array, z: jax.Array) -> jax.Array:
        b, t = y.shape[:2]
        y = gated_rmsnorm(y.reshape(b, t, self.d_inner), z, self.norm.weight[...], self.headdim,
                          self.mcfg.norm_eps)
        return self._out_proj(y.astype(jnp.dtype(self.dtype)))

    def __call__(self, x: jax.Array, ctx: Context, cache: MambaCache | None) -> tuple[jax.Array, MambaCache | None]:
        z, xbc, dt = self._project(x, ctx)
        t = x.shape[1]
        hist = None if cache is None or ctx.prefill else cache.conv
        conv = causal_conv(xbc, self.conv1d.weight[...], None if self.conv1d.bias is None else self.conv1d.bias[...],
                           hist, ctx.segment_ids)
        xs, B, C = self._heads(jax.nn.silu(conv).astype(xbc.dtype))
        A = -jnp.exp(self.A_log[...].astype(F32))
        D = self.D[...].astype(F32)
        init = None if cache is None or ctx.prefill else cache.ssm
        if init is not None and ctx.segment_ids is None and t == 1:
            y, final = ssd_step(init, xs, dt, A, B, C, D)
        elif init is not None and ctx.segment_ids is None and t <= MULTISTEP_MAX:
            y, states = ssd_ops.ssd_multistep(init, xs, dt, A, B, C, D=D, dt_softplus=False)
            final = states[:, -1]
        else:
            impl = dispatch.ssd if self.mcfg.scan == "kernel" else ssd_ops.SSD_IMPLS[self.mcfg.scan]
            y, final = impl(xs, dt, A, B, C, D=D, dt_softplus=False, initial_state=init,
                            segment_ids=ctx.segment_ids, chunk_size=self.mcfg.chunk_size)
        if cache is not None:
            cache = MambaCache(conv_window(xbc, hist, ctx.token_mask, ctx.segment_ids, self.mcfg.d_conv)
                               .astype(cache.conv.dtype), final)
        return self._out(y, z), cache

    def multistep(self, x: jax.Array, ctx: Context, cache: MambaCache) -> tuple[jax.Array, MambaChunk]:
        """k decode steps on real tokens (verification): outputs and a `MambaChunk` (see `models/cache.py`).

        One call of the multistep-verify op (`pallas_kernels.dispatch.verify`: the Pallas kernel on GPU) with
        accepted = k gives the outputs and the last state; acceptance later advances `cache` by its count."""
        y, chunk = self.multistep_gated(self._in(x), ctx, cache)
        return self._out_proj(y), chunk

    def multistep_gated(self, zxbcdt: jax.Array, ctx: Context,
                        cache: MambaCache) -> tuple[jax.Array, MambaChunk]:
        """`multistep` between the projections: from in_proj's output to the gated-normed y (b, k, d_inner), so
        that inference copies can run the projections as their own (fused) kernels. The chunk's tokens are real
        (verification), so `ctx`'s token mask is not read."""
        del ctx
        A = -jnp.exp(self.A_log[...].astype(F32))
        y, conv_in, xs, dt, B, window, final = self._chunk_steps(
            zxbcdt, cache.conv, cache.ssm, self.conv1d.weight[...],
            None if self.conv1d.bias is None else self.conv1d.bias[...], self.dt_bias[...], A, self.D[...],
            self.norm.weight[...], d_inner=self.d_inner, d_xb=self.d_xb, eps=self.mcfg.norm_eps)
        return y.astype(jnp.dtype(self.dtype)), MambaChunk(cache, MambaCache(window, final), conv_in, xs, dt, B, A,
                                                          "mamba2")

    def _chunk_steps(self, *args: Any, **kw: Any) -> tuple[jax.Array, ...]:
        """`mamba2_chunk_reference`; inference copies put the one-launch kernel here."""
        return mamba2_chunk_reference(*args, **kw)


# ------------------------------------------------------------------------------------------------------ Mamba1


class Mamba1(nnx.Module):
    """MambaInLlama's Mamba1 mixer: separate projections, x repeated to d_inner before the conv, grouped B/C.

    The official code adds `dt_proj.bias` twice (once in `dt_proj`, once as the scan's `delta_bias`); its
    checkpoints were trained that way, so this does the same.
    """

    def __init__(self, cfg: LlamaConfig, mcfg: MambaConfig, *, rngs: nnx.Rngs | None):
        d = cfg.hidden_size
        self.d_inner, self.d_xb, self.d_state = _dims(cfg, mcfg)
        if self.d_inner % self.d_state or self.d_xb % self.d_state:
            raise ConfigError(f"mamba1 d_state ({self.d_state}) must divide d_inner ({self.d_inner}) and d_xb "
                              f"({self.d_xb})")
        self.dt_rank = mcfg.dt_rank or math.ceil(d / 16)
        self.mcfg, self.dtype = mcfg, cfg.dtype
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.in_proj_x = UniformLinear(d, self.d_xb, ("embed", "ssm_xb"), **kw)
        self.in_proj_z = UniformLinear(d, self.d_inner, ("embed", "ssm_inner"), **kw)
        self.B_proj = UniformLinear(d, self.d_xb, ("embed", "ssm_xb"), **kw)
        self.C_proj = UniformLinear(d, self.d_inner, ("embed", "ssm_inner"), **kw)
        self.dt_proj_down = UniformLinear(d, self.dt_rank, ("embed", "dt_rank"), **kw)
        self.dt_proj = UniformLinear(self.dt_rank, self.d_inner, ("dt_rank", "ssm_inner"), use_bias=True,
                                     bound=self.dt_rank ** -0.5, bias_init=dt_bias_init(mcfg), **kw)
        self.conv1d = Conv1d(self.d_inner, mcfg.d_conv, "ssm_inner", use_bias=mcfg.conv_bias,
                             param_dtype=cfg.param_dtype, rngs=rngs)
        pdt = jnp.dtype(cfg.param_dtype)
        self.A_log = param(rngs, s4d_a_log_init, (self.d_inner, self.d_state), ("ssm_inner", "ssm_state"), pdt)
        self.D = param(rngs, ones, (self.d_inner,), ("ssm_inner",), pdt)
        self.out_proj = UniformLinear(self.d_inner, d, ("ssm_inner", "embed"), **kw)

    def init_cache(self, batch: int, slots: int) -> MambaCache:
        del slots
        return MambaCache.allocate(batch, self.d_inner, self.mcfg.d_conv, (self.d_inner, self.d_state),
                                   jnp.dtype(self.dtype))

    def _project(self, x: jax.Array, ctx: Context):
        rep = self.d_inner // self.d_xb
        mask = ctx.token_mask[..., None]
        xi = jnp.where(mask, repeat_groups(self.in_proj_x(x), self.d_state, rep), 0)
        z = self.in_proj_z(x)
        b, t, _ = x.shape
        B = repeat_groups(self.B_proj(x), self.d_state, rep).reshape(b, t, -1, self.d_state)
        C = self.C_proj(x).reshape(b, t, -1, self.d_state)
        dt = self.dt_proj(self.dt_proj_down(x)).astype(F32) + self.dt_proj.bias[...].astype(F32)
        dt = jax.nn.softplus(dt) * mask
        return xi, z, B, C, dt

    def _conv(self, xi: jax.Array, hist: jax.Array | None, segment_ids: jax.Array | None) -> jax.Array:
        bias = None if self.conv1d.bias is None else self.conv1d.bias[...]
        return jax.nn.silu(causal_conv(xi, self.conv1d.weight[...], bias, hist, segment_ids)).astype(xi.dtype)

    def __call__(self, x: jax.Array, ctx: Context, cache: MambaCache | None) -> tuple[jax.Array, MambaCache | None]:
        xi, z, B, C, dt = self._project(x, ctx)
        hist = None if cache is None or ctx.prefill else cache.conv
        u = self._conv(xi, hist, ctx.segment_ids)
        A = -jnp.exp(self.A_log[...].astype(F32))
        D = self.D[...].astype(F32)
        init = None if cache is None or ctx.prefill else cache.ssm
        if init is not None and ctx.segment_ids is None and x.shape[1] <= MULTISTEP_MAX:
            y, states = scan_ops.selective_scan_multistep(init, u, dt, A, B, C, D=D, z=z, delta_softplus=False)
            final = states[:, -1]
        else:
            impl = (dispatch.selective_scan if self.mcfg.scan == "kernel"
                    else scan_ops.SELECTIVE_IMPLS.get(self.mcfg.scan, scan_ops.selective_scan))
            y, final = impl(u, dt, A, B, C, D=D, z=z, delta_softplus=False, initial_state=init,
                            segment_ids=ctx.segment_ids)
        if cache is not None:
            cache = MambaCache(conv_window(xi, hist, ctx.token_mask, ctx.segment_ids, self.mcfg.d_conv)
                               .astype(cache.conv.dtype), final)
        return self.out_proj(y), cache

    def multistep(self, x: jax.Array, ctx: Context, cache: MambaCache) -> tuple[jax.Array, MambaChunk]:
        """k decode steps on real tokens (verification): outputs and a `MambaChunk` (see `models/cache.py`).
        No kernel for Mamba1: the sequential scan, which keeps only the last state."""
        xi, z, B, C, dt = self._project(x, ctx)
        u = self._conv(xi, cache.conv, None)
        A = -jnp.exp(self.A_log[...].astype(F32))
        y, final = scan_ops.selective_scan(u, dt, A, B, C, D=self.D[...].astype(F32), z=z, delta_softplus=False,
                                           initial_state=cache.ssm)
        return self.out_proj(y), _chunk(cache, xi, u, dt, B, A, final, "mamba1")


def chunk_window(conv: jax.Array, conv_in: jax.Array) -> jax.Array:
    """The conv window (b, channels, d_conv) after a chunk of inputs conv_in (b, t, channels) in conv's dtype: the
    tail of old window ++ inputs."""
    return jnp.concatenate([conv, jnp.swapaxes(conv_in, 1, 2)], axis=2)[:, :, -conv.shape[2]:]


def _chunk(cache: MambaCache, conv_in: jax.Array, x: jax.Array, dt: jax.Array, B: jax.Array, A: jax.Array,
           final: jax.Array, variant: str) -> MambaChunk:
    """The pending chunk of a verify call, its cache after all of it (`chunk_window`, the final state)."""
    conv_in = conv_in.astype(cache.conv.dtype)
    return MambaChunk(cache, MambaCache(chunk_window(cache.conv, conv_in), final), conv_in, x, dt, B, A, variant)


def make_mixer(cfg: LlamaConfig, mcfg: MambaConfig, *, rngs: nnx.Rngs | None) -> nnx.Module:
    """The Mamba mixer of the configured variant."""
    return (Mamba2 if mcfg.variant == "mamba2" else Mamba1)(cfg, mcfg, rngs=rngs)
