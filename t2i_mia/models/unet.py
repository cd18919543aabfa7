"""The text-conditioned U-Net denoiser of latent diffusion (Stable Diffusion 1.x/2.x), in Flax.

Parameter trees equal diffusers' ``FlaxUNet2DConditionModel``
(``unet/diffusion_flax_model.msgpack``) key for key. Our API is NHWC:

  ``UNet2DConditionModel(cfg).apply({"params": p}, sample f32[B,h,w,in_channels],
  timesteps int32|f32[B], encoder_hidden_states f32[B,L,cross_attention_dim], train=False)
  -> f32[B,h,w,out_channels]``

``train=True`` enables dropout (``rngs={"dropout": key}``) when ``cfg.dropout > 0``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_mia.errors import ConfigError
from t2i_mia.models import formats
from t2i_mia.models.norms import GroupNorm
from t2i_mia.models.precision import Typed

PyTree = Any

UNET_WEIGHTS = "diffusion_flax_model.msgpack"
CONFIG_NAME = "config.json"

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
GROUPS = 32  # diffusers' Flax U-Net hard-codes GroupNorm(32, eps=1e-5)

# Keys that carry no computation for us.
_IGNORED_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path",
    # memory-efficient attention computes the same function in chunks
    "use_memory_efficient_attention",
    # fp16 numerics switch in torch; we compute attention in float32
    "upcast_attention",
})

# Keys written by torch diffusers into Stable Diffusion folders (config.json is shared
# between torch and Flax): accepted only at the value that the Flax architecture has.
_FIXED_KEYS: Mapping[str, tuple] = {
    "act_fn": ("silu", "swish"),
    "center_input_sample": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "norm_eps": (1e-5,),
    "norm_num_groups": (GROUPS,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "dual_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "timestep_post_act": (None,),
    "time_embedding_act_fn": (None,),
    "time_embedding_dim": (None,),
    "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "mid_block_only_cross_attention": (None,),
    "class_embeddings_concat": (False,),
    "attention_type": ("default",),
    "reverse_transformer_layers_per_block": (None,),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_pos_int(v) -> bool:
    return _is_int(v) and v > 0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_or_list(v, n: int) -> bool:
    return _is_pos_int(v) or (isinstance(v, (list, tuple)) and len(v) == n
                              and all(_is_pos_int(x) for x in v))


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """diffusers ``FlaxUNet2DConditionModel`` config; field names are the ``config.json`` keys.

    Heads per block: ``num_attention_heads`` when set, else ``attention_head_dim`` (which in
    Stable Diffusion configs holds the number of heads, a known diffusers naming quirk); the
    head size is the block's channels divided by the heads.
    """

    sample_size: int = 32
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 1280
    dropout: float = 0.0
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    split_head_dim: bool = False
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # the extra (SDXL) embedding is not implemented: only None is accepted; the three keys
    # after it are inert without it
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    addition_embed_type_num_heads: int = 64
    projection_class_embeddings_input_dim: int | None = None
    # Numerics that differ between diffusers' two U-Nets and are in no config.json: its Flax
    # U-Net uses GroupNorm eps 1e-5 in the spatial transformers and the tanh GELU, its
    # PyTorch U-Net eps 1e-6 and the exact (erf) GELU. The defaults are the Flax ones (Flax
    # checkpoints, models trained here); the PyTorch-layout loader sets the torch ones.
    transformer_norm_eps: float = 1e-5
    exact_gelu: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):  # lists (from JSON or callers) -> tuples: hashable
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        _validate(dataclasses.asdict(self), type(self).__name__)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads of each down block (up blocks use them reversed, mid the last)."""
        h = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return (h,) * len(self.down_block_types) if isinstance(h, int) else tuple(h)

    @property
    def transformer_depths(self) -> tuple[int, ...]:
        d = self.transformer_layers_per_block
        return (d,) * len(self.down_block_types) if isinstance(d, int) else tuple(d)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "unet config") -> "UNet2DConditionConfig":
        """Builds a config from a diffusers (Flax or torch) ``config.json`` dict.

        Raises ConfigError naming the key and value for anything we do not implement.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for key, value in d.items():
            if key in _IGNORED_KEYS or key.startswith("_"):
                continue
            if key in _FIXED_KEYS:
                if value not in _FIXED_KEYS[key] or isinstance(value, bool) != isinstance(
                        _FIXED_KEYS[key][0], bool):
                    raise ConfigError(f"{where}: '{key}' = {value!r} is not implemented "
                                      f"(supported: {list(_FIXED_KEYS[key])})")
                continue
            if key not in fields:
                raise ConfigError(f"{where}: key '{key}' (= {value!r}) is not implemented")
            kw[key] = value
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        _validate({**defaults, **kw}, where)  # first, so that errors name the file
        return cls(**kw)

    def to_dict(self) -> dict:
        """JSON-ready dict with the diffusers keys (lists for tuples); the two numerics
        fields only when they differ from the Flax defaults."""
        d = {k: list(v) if isinstance(v, tuple) else v
             for k, v in dataclasses.asdict(self).items()}
        for key, default in (("transformer_norm_eps", 1e-5), ("exact_gelu", False)):
            if d[key] == default:
                del d[key]
        return d


def _validate(d: dict, where: str) -> None:
    n = len(d["block_out_channels"]) if isinstance(d["block_out_channels"], (list, tuple)) else 0
    for key, known in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        bad = [b for b in d[key] if b not in known] if isinstance(d[key], (list, tuple)) else []
        if bad:
            raise ConfigError(f"{where}: '{key}' = {d[key]!r}: block {bad[0]!r} is not implemented "
                              f"(supported: {list(known)})")
    rules = {
        "sample_size": _is_pos_int,
        "in_channels": _is_pos_int,
        "out_channels": _is_pos_int,
        "down_block_types": lambda v: isinstance(v, (list, tuple)) and len(v) == n
        and all(x in DOWN_BLOCKS for x in v),
        "up_block_types": lambda v: isinstance(v, (list, tuple)) and len(v) == n
        and all(x in UP_BLOCKS for x in v),
        "mid_block_type": ("UNetMidBlock2DCrossAttn",),
        "only_cross_attention": lambda v: v is False,
        "block_out_channels": lambda v: isinstance(v, (list, tuple)) and len(v) > 0
        and all(_is_pos_int(x) and x % GROUPS == 0 for x in v),
        "layers_per_block": _is_pos_int,
        "attention_head_dim": lambda v: _int_or_list(v, n),
        "num_attention_heads": lambda v: v is None or _int_or_list(v, n),
        "cross_attention_dim": _is_pos_int,
        "dropout": lambda v: _is_number(v) and 0 <= v < 1,
        "use_linear_projection": lambda v: isinstance(v, bool),
        "flip_sin_to_cos": lambda v: isinstance(v, bool),
        "freq_shift": _is_number,
        "split_head_dim": lambda v: isinstance(v, bool),
        "transformer_layers_per_block": lambda v: _int_or_list(v, n),
        "addition_embed_type": lambda v: v is None,
        "addition_time_embed_dim": lambda v: v is None or _is_pos_int(v),
        "addition_embed_type_num_heads": _is_pos_int,
        "projection_class_embeddings_input_dim": lambda v: v is None or _is_pos_int(v),
        "transformer_norm_eps": (1e-5, 1e-6),
        "exact_gelu": lambda v: isinstance(v, bool),
    }
    formats.check_config_keys(d, rules, where)
    heads = d["num_attention_heads"] if d["num_attention_heads"] is not None else d["attention_head_dim"]
    heads = (heads,) * n if isinstance(heads, int) else tuple(heads)
    key = "num_attention_heads" if d["num_attention_heads"] is not None else "attention_head_dim"
    for ch, h in zip(d["block_out_channels"], heads):
        if ch % h:
            raise ConfigError(f"{where}: '{key}' = {d[key]!r}: {h} heads do not divide "
                              f"{ch} channels")


# --------------------------------------------------------------------------- layers


class _Typed(Typed):
    """U-Net layers: 3x3 and 1x1 convolutions, GroupNorm of GROUPS groups."""

    def conv3(self, features: int, name: str, stride: int = 1) -> nn.Conv:
        return self.conv(features, (3, 3), name, strides=(stride, stride),
                         padding=((1, 1), (1, 1)))

    def conv1(self, features: int, name: str) -> nn.Conv:
        return self.conv(features, (1, 1), name, strides=(1, 1), padding="VALID")

    def norm(self, name: str, epsilon: float = 1e-5) -> GroupNorm:
        return self.group_norm(GROUPS, name, epsilon)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 1.0e4) -> jax.Array:
    """Sinusoidal embedding f32[B, dim] of timesteps [B] (int or float)."""
    half = dim // 2
    step = math.log(max_period) / (half - freq_shift)
    inv_freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -step)
    angles = timesteps[:, None] * inv_freq[None, :]
    parts = (jnp.cos(angles), jnp.sin(angles)) if flip_sin_to_cos else (jnp.sin(angles), jnp.cos(angles))
    return jnp.concatenate(parts, axis=1)


class ResnetBlock(_Typed):
    """Resnet block with the time embedding added after the first conv. NHWC."""

    out_channels: int
    dropout: float

    @nn.compact
    def __call__(self, x, temb, deterministic: bool):
        h = self.norm("norm1")(x)
        h = self.conv3(self.out_channels, "conv1")(nn.swish(h))
        t = self.dense(self.out_channels, "time_emb_proj")(nn.swish(temb))
        h = h + t[:, None, None, :]
        h = self.norm("norm2")(h)
        h = nn.Dropout(self.dropout)(nn.swish(h), deterministic=deterministic)
        h = self.conv3(self.out_channels, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = self.conv1(self.out_channels, "conv_shortcut")(x)
        return h + x


# XLA's CPU backend runs one fused attention (scores, softmax, values) on one thread. Over
# at least this many (query, key) pairs, the heads are split into independent groups, one
# per usable core, which it runs concurrently: on 2 cores a transformer block at 32x32
# latents took 30 -> 23 ms; at 16x16 (65,536 pairs) splitting gained nothing (bench/README,
# "Peers"). Other backends fuse attention across their cores themselves.
CPU_SPLIT_MIN_PAIRS = 1024 * 1024


def _softmax_attend(q, k, v):
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def attention_groups(heads: int, pairs: int, backend: str) -> int:
    """Number of head groups attention over ``pairs`` (query, key) pairs is computed in."""
    if backend != "cpu" or pairs < CPU_SPLIT_MIN_PAIRS:
        return 1
    cores = _usable_cores()
    return max(g for g in range(1, heads + 1) if heads % g == 0 and g <= cores)


def attend(q, k, v):
    """Softmax attention, heads first: q f32[B,H,N,D] (pre-scaled), k, v f32[B,H,M,D] ->
    f32[B,H,N,D]; the same math whether or not the heads are split into groups."""
    groups = attention_groups(q.shape[1], q.shape[2] * k.shape[2], jax.default_backend())
    if groups == 1:
        return _softmax_attend(q, k, v)
    parts = zip(*(jnp.split(t, groups, axis=1) for t in (q, k, v)))
    return jnp.concatenate([_softmax_attend(*p) for p in parts], axis=1)


class Attention(_Typed):
    """Multi-head attention; queries from x f32[B,N,C], keys/values from context f32[B,M,D]."""

    query_dim: int
    heads: int
    dim_head: int
    dropout: float

    @nn.compact
    def __call__(self, x, context, deterministic: bool):
        inner = self.heads * self.dim_head
        # q is scaled, not the [N, M] scores, and the heads are a batch axis ahead of the
        # tokens: "bqhd,bkhd->bhqk" made XLA's CPU U-Net ~20% slower (bench/README, "Peers").
        q = self.dense(inner, "to_q", use_bias=False)(x) * (self.dim_head ** -0.5)
        k = self.dense(inner, "to_k", use_bias=False)(context)
        v = self.dense(inner, "to_v", use_bias=False)(context)
        heads = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads,  # noqa: E731
                                    self.dim_head).transpose(0, 2, 1, 3)
        out = attend(heads(q), heads(k), heads(v)).transpose(0, 2, 1, 3)
        out = self.dense(self.query_dim, "to_out_0")(out.reshape(x.shape[0], x.shape[1], inner))
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class GEGLU(_Typed):
    dim: int
    dropout: float
    exact_gelu: bool = False

    @nn.compact
    def __call__(self, x, deterministic: bool):
        h = self.dense(self.dim * 4 * 2, "proj")(x)
        lin, gate = jnp.split(h, 2, axis=-1)
        # the tanh approximation (flax's default) as diffusers' Flax U-Net; erf as torch's
        act = nn.gelu(gate, approximate=not self.exact_gelu)
        return nn.Dropout(self.dropout)(lin * act, deterministic=deterministic)


class FeedForward(_Typed):
    dim: int
    dropout: float
    exact_gelu: bool = False

    @nn.compact
    def __call__(self, x, deterministic: bool):
        h = GEGLU(self.dim, self.dropout, self.exact_gelu, name="net_0", **self.policy)(
            x, deterministic)
        return self.dense(self.dim, "net_2")(h)


class BasicTransformerBlock(_Typed):
    """Self-attention, cross-attention, GEGLU feed-forward; pre-LayerNorm residuals."""

    dim: int
    heads: int
    dim_head: int
    dropout: float
    exact_gelu: bool = False

    @nn.compact
    def __call__(self, x, context, deterministic: bool):
        attn = lambda name: Attention(self.dim, self.heads, self.dim_head, self.dropout,  # noqa: E731
                                      name=name, **self.policy)
        norm = self.layer_norm
        h = norm("norm1")(x)
        x = attn("attn1")(h, h, deterministic) + x
        x = attn("attn2")(norm("norm2")(x), context, deterministic) + x
        x = FeedForward(self.dim, self.dropout, self.exact_gelu, name="ff", **self.policy)(
            norm("norm3")(x), deterministic) + x
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class Transformer2D(_Typed):
    """Spatial transformer: GroupNorm, project in, transformer blocks, project out, residual."""

    channels: int
    heads: int
    depth: int
    use_linear_projection: bool
    dropout: float
    norm_eps: float = 1e-5
    exact_gelu: bool = False

    @nn.compact
    def __call__(self, x, context, deterministic: bool):
        b, hgt, wid, c = x.shape
        inner = self.channels  # heads * (channels // heads)
        proj = (lambda name: self.dense(inner, name)) if self.use_linear_projection else (
            lambda name: self.conv1(inner, name))
        h = self.norm("norm", self.norm_eps)(x)
        if self.use_linear_projection:
            h = proj("proj_in")(h.reshape(b, hgt * wid, c))
        else:
            h = proj("proj_in")(h).reshape(b, hgt * wid, inner)
        for i in range(self.depth):
            h = BasicTransformerBlock(inner, self.heads, inner // self.heads, self.dropout,
                                      self.exact_gelu, name=f"transformer_blocks_{i}",
                                      **self.policy)(h, context, deterministic)
        if self.use_linear_projection:
            h = proj("proj_out")(h).reshape(b, hgt, wid, c)
        else:
            h = proj("proj_out")(h.reshape(b, hgt, wid, inner))
        return nn.Dropout(self.dropout)(h + x, deterministic=deterministic)


class DownBlock(_Typed):
    """``CrossAttnDownBlock2D`` (``cross_attn``) or ``DownBlock2D``. Returns (x, skips)."""

    out_channels: int
    num_layers: int
    cross_attn: bool
    heads: int
    depth: int
    use_linear_projection: bool
    add_downsample: bool
    dropout: float
    norm_eps: float = 1e-5
    exact_gelu: bool = False

    @nn.compact
    def __call__(self, x, temb, context, deterministic: bool):
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.dropout, name=f"resnets_{i}",
                            **self.policy)(x, temb, deterministic)
            if self.cross_attn:
                x = Transformer2D(self.out_channels, self.heads, self.depth, self.use_linear_projection,
                                  self.dropout, self.norm_eps, self.exact_gelu,
                                  name=f"attentions_{i}", **self.policy)(x, context, deterministic)
            skips.append(x)
        if self.add_downsample:
            x = _Downsample(self.out_channels, name="downsamplers_0", **self.policy)(x)
            skips.append(x)
        return x, skips


class _Downsample(_Typed):
    channels: int

    @nn.compact
    def __call__(self, x):
        return self.conv3(self.channels, "conv", stride=2)(x)


class _Upsample(_Typed):
    channels: int

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
        return self.conv3(self.channels, "conv")(x)


class UpBlock(_Typed):
    """``CrossAttnUpBlock2D`` (``cross_attn``) or ``UpBlock2D``; consumes skips last-first."""

    out_channels: int
    num_layers: int
    cross_attn: bool
    heads: int
    depth: int
    use_linear_projection: bool
    add_upsample: bool
    dropout: float
    norm_eps: float = 1e-5
    exact_gelu: bool = False

    @nn.compact
    def __call__(self, x, skips, temb, context, deterministic: bool):
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = ResnetBlock(self.out_channels, self.dropout, name=f"resnets_{i}",
                            **self.policy)(x, temb, deterministic)
            if self.cross_attn:
                x = Transformer2D(self.out_channels, self.heads, self.depth, self.use_linear_projection,
                                  self.dropout, self.norm_eps, self.exact_gelu,
                                  name=f"attentions_{i}", **self.policy)(x, context, deterministic)
        if self.add_upsample:
            x = _Upsample(self.out_channels, name="upsamplers_0", **self.policy)(x)
        return x


class MidBlock(_Typed):
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

    channels: int
    heads: int
    depth: int
    use_linear_projection: bool
    dropout: float
    norm_eps: float = 1e-5
    exact_gelu: bool = False

    @nn.compact
    def __call__(self, x, temb, context, deterministic: bool):
        x = ResnetBlock(self.channels, self.dropout, name="resnets_0", **self.policy)(
            x, temb, deterministic)
        x = Transformer2D(self.channels, self.heads, self.depth, self.use_linear_projection,
                          self.dropout, self.norm_eps, self.exact_gelu,
                          name="attentions_0", **self.policy)(x, context, deterministic)
        return ResnetBlock(self.channels, self.dropout, name="resnets_1", **self.policy)(
            x, temb, deterministic)


class TimestepEmbedding(_Typed):
    dim: int

    @nn.compact
    def __call__(self, x):
        x = self.dense(self.dim, "linear_1")(x)
        return self.dense(self.dim, "linear_2")(nn.silu(x))


class UNet2DConditionModel(nn.Module):
    """Text-conditioned U-Net (NHWC); its params are diffusers' Flax tree as is.

    ``dtype``: the computation dtype of its matmuls and convolutions (bfloat16 on
    accelerators); ``param_dtype``: its parameters' (float32 master weights by default).
    Norms and softmax compute in float32; the output is float32."""

    cfg: UNet2DConditionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 train: bool = False) -> jax.Array:
        """sample f32[B,h,w,in], timesteps int/float[B] (or a scalar), context f32[B,L,D]
        -> model output f32[B,h,w,out] (noise or v, as the model was trained)."""
        cfg = self.cfg
        det = not train
        chans = cfg.block_out_channels
        heads, depths = cfg.heads, cfg.transformer_depths
        n = len(chans)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))

        temb = timestep_embedding(timesteps, chans[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        policy = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        temb = TimestepEmbedding(4 * chans[0], name="time_embedding", **policy)(temb)

        x = nn.Conv(chans[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_in", **policy)(sample)
        skips = [x]
        for i, kind in enumerate(cfg.down_block_types):
            x, s = DownBlock(chans[i], cfg.layers_per_block, kind == "CrossAttnDownBlock2D", heads[i],
                             depths[i], cfg.use_linear_projection, add_downsample=i != n - 1,
                             dropout=cfg.dropout, norm_eps=cfg.transformer_norm_eps,
                             exact_gelu=cfg.exact_gelu, name=f"down_blocks_{i}", **policy)(
                                 x, temb, encoder_hidden_states, det)
            skips += s
        x = MidBlock(chans[-1], heads[-1], depths[-1], cfg.use_linear_projection, cfg.dropout,
                     cfg.transformer_norm_eps, cfg.exact_gelu,
                     name="mid_block", **policy)(x, temb, encoder_hidden_states, det)
        rev_chans, rev_heads, rev_depths = chans[::-1], heads[::-1], depths[::-1]
        per_block = cfg.layers_per_block + 1
        for i, kind in enumerate(cfg.up_block_types):
            s, skips = skips[-per_block:], skips[:-per_block]
            x = UpBlock(rev_chans[i], per_block, kind == "CrossAttnUpBlock2D", rev_heads[i],
                        rev_depths[i], cfg.use_linear_projection, add_upsample=i != n - 1,
                        dropout=cfg.dropout, norm_eps=cfg.transformer_norm_eps,
                        exact_gelu=cfg.exact_gelu, name=f"up_blocks_{i}", **policy)(
                            x, s, temb, encoder_hidden_states, det)
        x = GroupNorm(num_groups=GROUPS, epsilon=1e-5, name="conv_norm_out",
                      dtype=jnp.float32, param_dtype=self.param_dtype)(x)
        out = nn.Conv(cfg.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out",
                      **policy)(nn.silu(x))
        return out.astype(jnp.float32)


def init_params(cfg: UNet2DConditionConfig, rng: jax.Array, context_len: int = 1) -> PyTree:
    """Random parameters (diffusers' tree)."""
    s = cfg.downsample_factor
    init = jax.jit(UNet2DConditionModel(cfg).init)  # compiled: far faster than op by op
    return init(rng, jnp.zeros((1, s, s, cfg.in_channels), jnp.float32), jnp.ones((1,), jnp.int32),
                jnp.zeros((1, context_len, cfg.cross_attention_dim), jnp.float32))["params"]


def param_shapes(cfg: UNet2DConditionConfig) -> PyTree:
    """Tree of ``jax.ShapeDtypeStruct`` the checkpoint must hold (no compute)."""
    return jax.eval_shape(lambda r: init_params(cfg, r), jax.random.key(0))


def load_unet(folder: str | os.PathLike) -> tuple[UNet2DConditionConfig, PyTree]:
    """Reads ``config.json`` + ``diffusion_flax_model.msgpack``.

    Errors name the file and the key or tensor at fault.
    """
    return formats.load_config_and_params(folder, UNet2DConditionConfig, UNET_WEIGHTS,
                                          param_shapes, CONFIG_NAME)


def save_unet(folder: str | os.PathLike, cfg: UNet2DConditionConfig, params: PyTree) -> None:
    """Writes the diffusers Flax layout (each file atomically)."""
    formats.save_config_and_params(folder, cfg, params, UNET_WEIGHTS, param_shapes, "FlaxUNet2DConditionModel",
                                   CONFIG_NAME)
