"""VQGAN (taming-transformers, as ported to Flax by vqgan-jax), natively in Flax linen.

The parameter tree of :class:`VQModel` matches vqgan-jax's ``flax_model.msgpack`` key for
key (``encoder/down_0/block_0/conv1/kernel``, ``quantize/embedding/embedding``, ...), so
the public ``dalle-mini/vqgan_imagenet_f16_16384`` checkpoint loads with
:func:`load_vqgan`.

Layout (NHWC throughout):
  encoder: conv_in -> down_i (num_res_blocks ResNet blocks, attention where the *config*
  resolution of that level is in ``attn_resolutions``, a stride-2 downsample except on the
  last level) -> mid (block_1, attn_1, block_2) -> GroupNorm, swish, conv_out.
  quant_conv (1x1) -> nearest codebook entry -> post_quant_conv (1x1) -> decoder (mirror
  image, num_res_blocks + 1 blocks per level, nearest 2x upsampling).

As in vqgan-jax, which levels carry attention depends on ``resolution`` in the config, not
on the size of the image passed in; any square image whose side is a multiple of
``2 ** (num_resolutions - 1)`` can be tokenised.

Codebook indices are ``argmin_j |z|^2 + |e_j|^2 - 2 z.e_j`` (the reference's formula; the
algebraically equal ``|z - e_j|^2`` rounds differently and can flip float32 near-ties),
computed at HIGHEST matmul precision so accelerators do not use reduced-precision
products for it.

Training a small VQGAN: :meth:`VQModel.__call__` is the straight-through forward and
:func:`vqgan_loss` the reconstruction (L1 + MSE) + codebook + commitment (beta) loss.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from t2i_mia.errors import ConfigError, DataError
from t2i_mia.models import formats
from t2i_mia.models.norms import GroupNorm
from t2i_mia.models.precision import module_policy

PyTree = Any

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "flax_model.msgpack"

# Keys of a Hugging Face config.json that carry no computation for this model.
_IGNORED_KEYS = frozenset({
    "transformers_version", "architectures", "torch_dtype", "model_type", "name_or_path",
})
_GROUPS = 32  # vqgan-jax uses GroupNorm(32 groups, eps 1e-6) everywhere


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """vqgan-jax ``config.json``; field names are its keys, defaults are vqgan-jax's."""

    ch: int = 128
    out_ch: int = 3
    in_channels: int = 3
    num_res_blocks: int = 2
    resolution: int = 256
    z_channels: int = 256
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    attn_resolutions: tuple[int, ...] = (16,)
    n_embed: int = 1024
    embed_dim: int = 256
    dropout: float = 0.0
    double_z: bool = False
    resamp_with_conv: bool = True
    give_pre_end: bool = False
    num_resolutions: int | None = None  # derived: len(ch_mult); checked when given

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        if self.num_resolutions is None:
            object.__setattr__(self, "num_resolutions", len(self.ch_mult))
        _validate_vqgan(self)

    @property
    def downsample_factor(self) -> int:
        """Pixels per token along each side: 2 ** (num_resolutions - 1)."""
        return 2 ** (self.num_resolutions - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "VQGANConfig") -> "VQGANConfig":
        """Builds a config from a ``config.json`` dict; ConfigError names key and value."""
        names = {f.name for f in dataclasses.fields(cls)}
        supported = {n: (lambda v: True) for n in names}
        supported["model_type"] = lambda v: True
        formats.check_config_keys(d, supported, where, ignored=_IGNORED_KEYS)
        kwargs = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d


def _validate_vqgan(c: VQGANConfig) -> None:
    def bad(key, why):
        raise ConfigError(f"'{key}' = {getattr(c, key)!r}: {why}")

    for key in ("ch", "out_ch", "in_channels", "num_res_blocks", "resolution", "z_channels",
                "n_embed", "embed_dim"):
        v = getattr(c, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            bad(key, "expected a positive integer")
    if not c.ch_mult or not all(isinstance(m, int) and m >= 1 for m in c.ch_mult):
        bad("ch_mult", "expected a non-empty list of positive integers")
    if c.num_resolutions != len(c.ch_mult):
        bad("num_resolutions", f"must equal len(ch_mult) = {len(c.ch_mult)}")
    for m in c.ch_mult:
        if (c.ch * m) % _GROUPS:
            bad("ch", f"ch * ch_mult ({c.ch} * {m}) must be a multiple of {_GROUPS} "
                      "(GroupNorm with 32 groups)")
    if not all(isinstance(r, int) and r >= 1 for r in c.attn_resolutions):
        bad("attn_resolutions", "expected a list of positive integers")
    if c.resolution % c.downsample_factor:
        bad("resolution", f"must be a multiple of 2 ** (num_resolutions - 1) = "
                          f"{c.downsample_factor}")
    if not isinstance(c.dropout, (int, float)) or not 0.0 <= c.dropout < 1.0:
        bad("dropout", "expected a float in [0, 1)")
    for key in ("double_z", "resamp_with_conv", "give_pre_end"):
        if not isinstance(getattr(c, key), bool):
            bad(key, "expected true or false")
    if c.give_pre_end:
        bad("give_pre_end", "is not implemented (the decoder must return images; "
                            "supported: [False])")


# ----------------------------------------------------------------------------- modules

def _conv(features: int, k: int, name: str, owner: nn.Module, stride: int = 1,
          padding="SAME_1"):
    if padding == "SAME_1":
        padding = ((k // 2, k // 2), (k // 2, k // 2))
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=padding, name=name,
                   **module_policy(owner))


def _norm(name: str, owner: nn.Module):
    # float32 statistics (flax's rule), output in the owner's dtype
    return GroupNorm(num_groups=_GROUPS, epsilon=1e-6, name=name, **module_policy(owner))


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv x2 with a 1x1 ``nin_shortcut`` when channels change."""

    out_channels: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        h = _conv(self.out_channels, 3, "conv1", self)(nn.swish(_norm("norm1", self)(x)))
        h = nn.swish(_norm("norm2", self)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = _conv(self.out_channels, 3, "conv2", self)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "nin_shortcut", self, padding="VALID")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = _norm("norm", self)(x)
        q = _conv(c, 1, "q", self, padding="VALID")(y).reshape(b, h * w, c)
        k = _conv(c, 1, "k", self, padding="VALID")(y).reshape(b, h * w, c)
        v = _conv(c, 1, "v", self, padding="VALID")(y).reshape(b, h * w, c)
        logits = jnp.einsum("bqc,bkc->bqk", q, k) * (int(c) ** -0.5)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum("bqk,bkc->bqc", attn, v).reshape(b, h, w, c)
        return x + _conv(c, 1, "proj_out", self, padding="VALID")(y)


class _Resample(nn.Module):
    """``down``: pad right/bottom by 1 then 3x3 stride-2 conv (or 2x2 average pool);
    ``up``: nearest 2x then 3x3 conv (conv optional in both, per resamp_with_conv)."""

    channels: int
    up: bool
    with_conv: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            if self.with_conv:
                x = _conv(self.channels, 3, "conv", self)(x)
            return x
        if self.with_conv:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return _conv(self.channels, 3, "conv", self, stride=2, padding="VALID")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class _Level(nn.Module):
    """One resolution level: ``block_i`` (+ ``attn_i``) then ``downsample``/``upsample``."""

    out_channels: int
    n_blocks: int
    use_attn: bool
    resample: str | None  # "downsample", "upsample" or None
    with_conv: bool
    dropout: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        for i in range(self.n_blocks):
            x = ResnetBlock(self.out_channels, self.dropout, name=f"block_{i}",
                            **module_policy(self))(x, deterministic)
            if self.use_attn:
                x = AttnBlock(name=f"attn_{i}", **module_policy(self))(x)
        if self.resample is not None:
            x = _Resample(self.out_channels, self.resample == "upsample", self.with_conv,
                          name=self.resample, **module_policy(self))(x)
        return x


class _Mid(nn.Module):
    channels: int
    dropout: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = ResnetBlock(self.channels, self.dropout, name="block_1", **module_policy(self))(
            x, deterministic)
        x = AttnBlock(name="attn_1", **module_policy(self))(x)
        return ResnetBlock(self.channels, self.dropout, name="block_2", **module_policy(self))(
            x, deterministic)


class Encoder(nn.Module):
    """f32[B,H,W,in_channels] -> f32[B,H/f,W/f,z_channels (x2 if double_z)]."""

    config: VQGANConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        c = self.config
        x = _conv(c.ch, 3, "conv_in", self)(x)
        res = c.resolution
        for i, mult in enumerate(c.ch_mult):
            last = i == c.num_resolutions - 1
            x = _Level(c.ch * mult, c.num_res_blocks, res in c.attn_resolutions,
                       None if last else "downsample", c.resamp_with_conv, c.dropout,
                       name=f"down_{i}", **module_policy(self))(x, deterministic)
            if not last:
                res //= 2
        x = _Mid(c.ch * c.ch_mult[-1], c.dropout, name="mid", **module_policy(self))(
            x, deterministic)
        x = nn.swish(_norm("norm_out", self)(x))
        return _conv(2 * c.z_channels if c.double_z else c.z_channels, 3, "conv_out",
                     self)(x)


class Decoder(nn.Module):
    """f32[B,h,w,z_channels] -> f32[B,h*f,w*f,out_ch]."""

    config: VQGANConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z, deterministic: bool = True):
        c = self.config
        x = _conv(c.ch * c.ch_mult[-1], 3, "conv_in", self)(z)
        x = _Mid(c.ch * c.ch_mult[-1], c.dropout, name="mid", **module_policy(self))(
            x, deterministic)
        res = c.resolution // c.downsample_factor
        for i in reversed(range(c.num_resolutions)):
            x = _Level(c.ch * c.ch_mult[i], c.num_res_blocks + 1, res in c.attn_resolutions,
                       "upsample" if i != 0 else None, c.resamp_with_conv, c.dropout,
                       name=f"up_{i}", **module_policy(self))(x, deterministic)
            if i != 0:
                res *= 2
        x = nn.swish(_norm("norm_out", self)(x))
        return _conv(c.out_ch, 3, "conv_out", self)(x)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation; the table is ``embedding/embedding`` f32[n,E]."""

    n_embed: int
    embed_dim: int

    def setup(self):
        # taming-transformers' initialisation (uniform +-1/n); checkpoints overwrite it.
        lim = 1.0 / self.n_embed
        self.embedding = nn.Embed(
            self.n_embed, self.embed_dim,
            embedding_init=lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -lim, lim))

    def codebook(self) -> jax.Array:
        return self.embedding.embedding

    def __call__(self, z):
        """f32[B,h,w,E] -> (z_q f32[B,h,w,E], indices int32[B,h*w])."""
        table = self.codebook()
        flat = z.reshape(-1, self.embed_dim).astype(jnp.float32)
        dist = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(table ** 2, axis=1)
                - 2.0 * jnp.dot(flat, table.T, precision=jax.lax.Precision.HIGHEST))
        idx = jnp.argmin(dist, axis=1).astype(jnp.int32)
        z_q = jnp.take(table, idx, axis=0).reshape(z.shape)
        return z_q, idx.reshape(z.shape[0], -1)

    def lookup(self, indices):
        """int32[B,n] -> f32[B,n,E]."""
        return jnp.take(self.codebook(), indices, axis=0)


def check_image_size(cfg: VQGANConfig, shape: tuple[int, ...], what: str = "pixel_values"):
    """Raises DataError unless ``shape`` is [B,H,W,in_channels] with H == W a multiple of
    the downsampling factor (the token grid must be square for ``decode_code``)."""
    f = cfg.downsample_factor
    if len(shape) != 4 or shape[-1] != cfg.in_channels:
        raise DataError(f"{what}: shape {tuple(shape)}, expected [B, H, W, {cfg.in_channels}] "
                        "(NHWC, values in [-1, 1])")
    _, h, w, _ = shape
    if h % f or w % f:
        raise DataError(f"{what}: image size {h}x{w} cannot be tokenised: height and width "
                        f"must be multiples of {f} (2 ** (num_resolutions - 1))")
    if h != w:
        raise DataError(f"{what}: image size {h}x{w} cannot be tokenised: expected a square "
                        f"image (the token grid is square, e.g. {cfg.resolution}x"
                        f"{cfg.resolution})")


def _check_codes_shape(shape: tuple[int, ...], what: str = "indices") -> int:
    if len(shape) != 2:
        raise DataError(f"{what}: shape {tuple(shape)}, expected [B, h*w]")
    side = math.isqrt(shape[1])
    if side * side != shape[1]:
        raise DataError(f"{what}: {shape[1]} tokens per image is not a square token grid "
                        "(expected h*w with h == w)")
    return side


class VQModel(nn.Module):
    """vqgan-jax ``VQModule``: encode/quantise/decode with matching parameter names."""

    config: VQGANConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, **module_policy(self))
        self.decoder = Decoder(c, **module_policy(self))
        self.quantize = VectorQuantizer(c.n_embed, c.embed_dim)
        self.quant_conv = nn.Conv(c.embed_dim, (1, 1), padding="VALID", **module_policy(self))
        self.post_quant_conv = nn.Conv(c.z_channels, (1, 1), padding="VALID", **module_policy(self))

    def encode_latents(self, pixel_values, deterministic: bool = True):
        """f32[B,H,W,C] in [-1,1] -> continuous latents z_e f32[B,h,w,embed_dim]."""
        check_image_size(self.config, pixel_values.shape)
        return self.quant_conv(self.encoder(pixel_values, deterministic)).astype(jnp.float32)

    def encode(self, pixel_values, deterministic: bool = True):
        """f32[B,H,W,C] in [-1,1] -> (quant_states f32[B,h,w,embed_dim], indices int32[B,h*w])."""
        return self.quantize(self.encode_latents(pixel_values, deterministic))

    def decode(self, quant_states, deterministic: bool = True):
        """f32[B,h,w,embed_dim] -> images f32[B,H,W,out_ch] (roughly in [-1,1])."""
        h = self.post_quant_conv(quant_states)
        return self.decoder(h, deterministic).astype(jnp.float32)

    def decode_code(self, indices, deterministic: bool = True):
        """int32[B,h*w] (square grid) -> images f32[B,H,W,out_ch]."""
        side = _check_codes_shape(indices.shape)
        z_q = self.quantize.lookup(indices).reshape(indices.shape[0], side, side, -1)
        return self.decode(z_q, deterministic)

    def __call__(self, pixel_values, deterministic: bool = True):
        """Straight-through forward for training.

        Returns ``(reconstruction f32[B,H,W,out_ch], aux)`` with ``aux`` = {"z_e": encoder
        latents, "z_q": their codebook entries, "indices": int32[B,h*w]}. Gradients reach
        the encoder through ``z_e + stop_gradient(z_q - z_e)``; the codebook learns only
        through the codebook loss in :func:`vqgan_loss`.
        """
        z_e = self.encode_latents(pixel_values, deterministic)
        z_q, indices = self.quantize(z_e)
        z_st = z_e + jax.lax.stop_gradient(z_q - z_e)
        return self.decode(z_st, deterministic), {"z_e": z_e, "z_q": z_q, "indices": indices}


# ----------------------------------------------------------------------------- functions

def init_vqgan(cfg: VQGANConfig, key: jax.Array, image_size: int | None = None) -> PyTree:
    """Random parameters (taming-style codebook init) for an image side ``image_size``."""
    s = image_size or cfg.resolution
    x = jnp.zeros((1, s, s, cfg.in_channels), jnp.float32)
    return jax.jit(lambda k: VQModel(cfg).init({"params": k}, x)["params"])(key)


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def encode(params: PyTree, cfg: VQGANConfig, pixel_values) -> tuple[jax.Array, jax.Array]:
    """Jitted ``VQModel.encode``: f32[B,H,W,C] -> (f32[B,h,w,E], int32[B,h*w])."""
    check_image_size(cfg, np.shape(pixel_values))
    return _encode_jit(params, cfg, jnp.asarray(pixel_values, jnp.float32))


def decode_code(params: PyTree, cfg: VQGANConfig, indices) -> jax.Array:
    """Jitted ``VQModel.decode_code``; DataError on a non-square grid or out-of-range codes."""
    _check_codes_shape(np.shape(indices))
    if _concrete(indices):
        arr = np.asarray(indices)
        if arr.size and (arr.min() < 0 or arr.max() >= cfg.n_embed):
            raise DataError(f"indices: values in [{arr.min()}, {arr.max()}], expected codes "
                            f"in [0, {cfg.n_embed})")
    return _decode_code_jit(params, cfg, jnp.asarray(indices, jnp.int32))


@functools.partial(jax.jit, static_argnums=1)
def _encode_jit(params, cfg, x):
    return VQModel(cfg).apply({"params": params}, x, method=VQModel.encode)


@functools.partial(jax.jit, static_argnums=1)
def _decode_code_jit(params, cfg, idx):
    return VQModel(cfg).apply({"params": params}, idx, method=VQModel.decode_code)


def vqgan_loss(params: PyTree, cfg: VQGANConfig, pixel_values, *, beta: float = 0.25,
               dropout_rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """VQ-VAE training loss on f32[B,H,W,C] images in [-1,1].

    loss = mean|x - x_hat| + mean (x - x_hat)^2                       (reconstruction)
         + mean (sg(z_e) - z_q)^2                                     (codebook)
         + beta * mean (z_e - sg(z_q))^2                              (commitment)
    with the straight-through estimator of :meth:`VQModel.__call__`. Dropout runs when
    ``dropout_rng`` is given. Returns ``(loss, metrics)``; metrics hold each term, the PSNR
    (images in [-1,1]) and the codebook perplexity of the batch.
    """
    deterministic = dropout_rng is None
    rngs = {} if deterministic else {"dropout": dropout_rng}
    x_hat, aux = VQModel(cfg).apply({"params": params}, pixel_values, deterministic,
                                    rngs=rngs)
    l1 = jnp.mean(jnp.abs(pixel_values - x_hat))
    mse = jnp.mean((pixel_values - x_hat) ** 2)
    codebook = jnp.mean((jax.lax.stop_gradient(aux["z_e"]) - aux["z_q"]) ** 2)
    commitment = jnp.mean((aux["z_e"] - jax.lax.stop_gradient(aux["z_q"])) ** 2)
    loss = l1 + mse + codebook + beta * commitment
    counts = jnp.bincount(aux["indices"].reshape(-1), length=cfg.n_embed)
    probs = counts / jnp.maximum(counts.sum(), 1)
    perplexity = jnp.exp(-jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0)))
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))  # peak-to-peak range 2
    metrics = {"loss": loss, "l1": l1, "mse": mse, "codebook": codebook,
               "commitment": commitment, "psnr": psnr, "perplexity": perplexity}
    return loss, metrics


# ----------------------------------------------------------------------------- checkpoints

def _expected_params(cfg: VQGANConfig) -> PyTree:
    s = cfg.downsample_factor  # smallest image: shapes do not depend on the size
    x = jax.ShapeDtypeStruct((1, s, s, cfg.in_channels), jnp.float32)
    return jax.eval_shape(lambda k, x: VQModel(cfg).init({"params": k}, x)["params"],
                          jax.random.PRNGKey(0), x)


def load_vqgan(folder: str | os.PathLike) -> tuple[VQGANConfig, PyTree]:
    """Reads a vqgan-jax folder (``config.json`` + ``flax_model.msgpack``).

    Returns ``(config, params)`` with params a nested dict of float32 numpy arrays.
    Raises ConfigError / CheckpointError naming the key or tensor at fault.
    """
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, CONFIG_NAME)
    cfg = VQGANConfig.from_dict(formats.read_json(cfg_path), cfg_path)
    w_path = os.path.join(folder, WEIGHTS_NAME)
    params = formats.match_tree(formats.read_msgpack(w_path), _expected_params(cfg), w_path)
    return cfg, params


def save_vqgan(folder: str | os.PathLike, cfg: VQGANConfig, params: PyTree) -> None:
    """Writes ``config.json`` + ``flax_model.msgpack`` in vqgan-jax's format (atomically)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    w_path = os.path.join(folder, WEIGHTS_NAME)
    params = formats.match_tree(jax.device_get(params), _expected_params(cfg), w_path)
    formats.write_msgpack(w_path, params)
    d = cfg.to_dict()
    d["architectures"] = ["VQModel"]
    formats.write_json(os.path.join(folder, CONFIG_NAME), d)
