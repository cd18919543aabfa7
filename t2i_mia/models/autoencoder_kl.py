"""The KL autoencoder of latent diffusion (Stable Diffusion's VAE), in Flax linen.

Parameter trees equal diffusers' ``FlaxAutoencoderKL`` (``vae/diffusion_flax_model.msgpack``)
key for key, so public Stable Diffusion Flax checkpoints load as they are. Unlike diffusers,
our API is NHWC throughout:

  ``encode(x f32[B,H,W,in_channels] in [-1,1]) -> (mean, logvar) f32[B,h,w,latent_channels]``
  ``decode(z f32[B,h,w,latent_channels]) -> f32[B,H,W,out_channels]``

with ``h = H / 2**(len(block_out_channels)-1)``. ``scaling_factor`` is *not* applied inside
the module: diffusion code multiplies latents by it (and divides before decoding).
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

VAE_WEIGHTS = "diffusion_flax_model.msgpack"
CONFIG_NAME = "config.json"

# Keys of a diffusers config.json that carry no computation for us.
_IGNORED_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path",
    # a torch mixed-precision switch; we compute in float32
    "force_upcast",
})

# Keys written by torch diffusers (Stable Diffusion folders share one config.json between
# torch and Flax): accepted only at the one value that matches the Flax architecture.
_FIXED_KEYS: Mapping[str, Any] = {
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "latents_mean": None,
    "latents_std": None,
    "shift_factor": None,
}


def _is_pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_list_of(v, item_ok) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(item_ok(x) for x in v)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers ``FlaxAutoencoderKL`` config; field names are the ``config.json`` keys."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215

    def __post_init__(self):
        for f in dataclasses.fields(self):  # lists (from JSON or callers) -> tuples: hashable
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        _validate(dataclasses.asdict(self), type(self).__name__)

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "vae config") -> "AutoencoderKLConfig":
        """Builds a config from a diffusers ``config.json`` dict.

        Raises ConfigError naming the key and value for anything we do not implement.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for key, value in d.items():
            if key in _IGNORED_KEYS or key.startswith("_"):
                continue
            if key in _FIXED_KEYS:
                if value != _FIXED_KEYS[key]:
                    raise ConfigError(f"{where}: '{key}' = {value!r} is not implemented "
                                      f"(supported: {_FIXED_KEYS[key]!r})")
                continue
            if key not in fields:
                raise ConfigError(f"{where}: key '{key}' (= {value!r}) is not implemented")
            kw[key] = value
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        _validate({**defaults, **kw}, where)  # first, so that errors name the file
        return cls(**kw)

    def to_dict(self) -> dict:
        """JSON-ready dict with the diffusers keys (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def _validate(d: dict, where: str) -> None:
    """Raises ConfigError naming the key and value the architecture cannot have."""
    for key, known in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        bad = [b for b in d[key] if b != known] if isinstance(d[key], (list, tuple)) else []
        if bad:
            raise ConfigError(f"{where}: '{key}' = {d[key]!r}: block {bad[0]!r} is not implemented "
                              f"(supported: [{known!r}])")
    rules = {
        "in_channels": _is_pos_int,
        "out_channels": _is_pos_int,
        "down_block_types": lambda v: _is_list_of(v, lambda x: x == "DownEncoderBlock2D"),
        "up_block_types": lambda v: _is_list_of(v, lambda x: x == "UpDecoderBlock2D"),
        "block_out_channels": lambda v: _is_list_of(v, _is_pos_int),
        "layers_per_block": _is_pos_int,
        "act_fn": ("silu", "swish"),
        "latent_channels": _is_pos_int,
        "norm_num_groups": _is_pos_int,
        "sample_size": _is_pos_int,
        "scaling_factor": lambda v: _is_number(v) and v > 0,
    }
    formats.check_config_keys(d, rules, where)
    n = len(d["block_out_channels"])
    for key in ("down_block_types", "up_block_types"):
        if len(d[key]) != n:
            raise ConfigError(f"{where}: '{key}' = {list(d[key])!r} must have one entry per "
                              f"block_out_channels ({n})")
    for c in d["block_out_channels"]:
        if c % d["norm_num_groups"]:
            raise ConfigError(f"{where}: 'block_out_channels' = {list(d['block_out_channels'])!r}: "
                              f"{c} is not divisible by norm_num_groups = {d['norm_num_groups']}")


# --------------------------------------------------------------------------- layers


class _Typed(Typed):
    """Autoencoder layers: 3x3 and 1x1 convolutions, GroupNorm with eps 1e-6."""

    def conv3(self, features: int, name: str) -> nn.Conv:
        return self.conv(features, (3, 3), name, strides=(1, 1), padding=((1, 1), (1, 1)))

    def conv1(self, features: int, name: str) -> nn.Conv:
        return self.conv(features, (1, 1), name, strides=(1, 1), padding="VALID")

    def norm(self, groups: int, name: str) -> GroupNorm:
        return self.group_norm(groups, name, 1e-6)


class VAEResnetBlock(_Typed):
    """GroupNorm-SiLU-conv twice plus a (1x1-projected) residual. NHWC in and out."""

    out_channels: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.norm(self.groups, "norm1")(x)
        h = self.conv3(self.out_channels, "conv1")(nn.swish(h))
        h = self.norm(self.groups, "norm2")(h)
        h = self.conv3(self.out_channels, "conv2")(nn.swish(h))
        if x.shape[-1] != self.out_channels:
            x = self.conv1(self.out_channels, "conv_shortcut")(x)
        return h + x


class VAEAttentionBlock(_Typed):
    """Single-head spatial self-attention with a residual (the VAE's mid block)."""

    channels: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = self.norm(self.groups, "group_norm")(x)
        h = h.reshape(b, hgt * wid, c)
        q = self.dense(self.channels, "query")(h)
        k = self.dense(self.channels, "key")(h)
        v = self.dense(self.channels, "value")(h)
        # scale split between q and k as diffusers does (same function, same rounding)
        scale = 1.0 / math.sqrt(math.sqrt(self.channels))
        scores = jnp.einsum("bqc,bkc->bqk", q * scale, k * scale).astype(jnp.float32)
        w = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        h = jnp.einsum("bqk,bkc->bqc", w, v)
        h = self.dense(self.channels, "proj_attn")(h)
        return h.reshape(b, hgt, wid, c) + x


class VAEMidBlock(_Typed):
    channels: int
    groups: int

    @nn.compact
    def __call__(self, x):
        x = VAEResnetBlock(self.channels, self.groups, name="resnets_0", **self.policy)(x)
        x = VAEAttentionBlock(self.channels, self.groups, name="attentions_0", **self.policy)(x)
        return VAEResnetBlock(self.channels, self.groups, name="resnets_1", **self.policy)(x)


class VAEDownsample(_Typed):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right (as diffusers)."""

    channels: int

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(self.channels, (3, 3), "conv", strides=(2, 2), padding="VALID")(x)


class VAEUpsample(_Typed):
    """Nearest-neighbour x2 then a 3x3 conv."""

    channels: int

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
        return self.conv3(self.channels, "conv")(x)


class VAEDownBlock(_Typed):
    """``DownEncoderBlock2D``: resnets, then an optional stride-2 downsample."""

    channels: int
    num_layers: int
    groups: int
    add_downsample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = VAEResnetBlock(self.channels, self.groups, name=f"resnets_{j}", **self.policy)(x)
        if self.add_downsample:
            x = VAEDownsample(self.channels, name="downsamplers_0", **self.policy)(x)
        return x


class VAEUpBlock(_Typed):
    """``UpDecoderBlock2D``: resnets, then an optional x2 upsample."""

    channels: int
    num_layers: int
    groups: int
    add_upsample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = VAEResnetBlock(self.channels, self.groups, name=f"resnets_{j}", **self.policy)(x)
        if self.add_upsample:
            x = VAEUpsample(self.channels, name="upsamplers_0", **self.policy)(x)
        return x


class VAEEncoder(_Typed):
    cfg: AutoencoderKLConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        g = cfg.norm_num_groups
        chans = cfg.block_out_channels
        x = self.conv3(chans[0], "conv_in")(x)
        for i, ch in enumerate(chans):
            x = VAEDownBlock(ch, cfg.layers_per_block, g, add_downsample=i != len(chans) - 1,
                             name=f"down_blocks_{i}", **self.policy)(x)
        x = VAEMidBlock(chans[-1], g, name="mid_block", **self.policy)(x)
        x = self.norm(g, "conv_norm_out")(x)
        return self.conv3(2 * cfg.latent_channels, "conv_out")(nn.swish(x))


class VAEDecoder(_Typed):
    cfg: AutoencoderKLConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.cfg
        g = cfg.norm_num_groups
        rev = list(reversed(cfg.block_out_channels))
        x = self.conv3(rev[0], "conv_in")(z)
        x = VAEMidBlock(rev[0], g, name="mid_block", **self.policy)(x)
        for i, ch in enumerate(rev):
            # the decoder has one resnet more per block than the encoder (diffusers layout)
            x = VAEUpBlock(ch, cfg.layers_per_block + 1, g, add_upsample=i != len(rev) - 1,
                           name=f"up_blocks_{i}", **self.policy)(x)
        x = self.norm(g, "conv_norm_out")(x)
        return self.conv3(cfg.out_channels, "conv_out")(nn.swish(x))


class AutoencoderKL(_Typed):
    """Stable Diffusion's KL autoencoder (NHWC); its params are diffusers' tree as is.

    ``AutoencoderKL(cfg).apply({"params": p}, x, method="encode")`` -> (mean, logvar);
    ``...apply({"params": p}, z, method="decode")`` -> images. ``dtype``/``param_dtype``:
    the precision policy (:mod:`t2i_mia.models.precision`); outputs are float32.
    """

    cfg: AutoencoderKLConfig

    def setup(self):
        self.encoder = VAEEncoder(self.cfg, **self.policy)
        self.decoder = VAEDecoder(self.cfg, **self.policy)
        self.quant_conv = self.conv1(2 * self.cfg.latent_channels, "quant_conv")
        self.post_quant_conv = self.conv1(self.cfg.latent_channels, "post_quant_conv")

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """f32[B,H,W,in] in [-1,1] -> (mean, logvar) f32[B,h,w,latent]; logvar clipped to [-30, 20]."""
        moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """f32[B,h,w,latent] (unscaled latents) -> f32[B,H,W,out] (roughly in [-1,1])."""
        return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None):
        """Encode, sample the posterior (its mean when ``rng`` is None), decode.

        Returns (reconstruction f32[B,H,W,out], mean, logvar).
        """
        mean, logvar = self.encode(x)
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        return self.decode(z), mean, logvar


def init_params(cfg: AutoencoderKLConfig, rng: jax.Array) -> PyTree:
    """Random parameters (diffusers' tree)."""
    x = jnp.zeros((1, cfg.downsample_factor, cfg.downsample_factor, cfg.in_channels), jnp.float32)
    return jax.jit(AutoencoderKL(cfg).init)(rng, x)["params"]  # compiled: far faster than op by op


def param_shapes(cfg: AutoencoderKLConfig) -> PyTree:
    """Tree of ``jax.ShapeDtypeStruct`` the checkpoint must hold (no compute)."""
    return jax.eval_shape(lambda r: init_params(cfg, r), jax.random.key(0))


def vae_loss(cfg: AutoencoderKLConfig, params: PyTree, images: jax.Array, rng: jax.Array, *,
             recon_loss: str = "l1", kl_weight: float = 1e-6, policy: dict | None = None
             ) -> tuple[jax.Array, dict]:
    """Training loss of the autoencoder: reconstruction + ``kl_weight`` * KL to N(0, I).

    Args:
      params: the model's params (differentiate with respect to these).
      images: f32[B,H,W,in] in [-1,1].
      rng: key for the posterior sample.
      recon_loss: "l1" or "mse", averaged over every pixel and channel.
      kl_weight: weight of the KL term; the KL is averaged over latent elements (so it is
        on the same per-element scale as the reconstruction term).
      policy: the precision (``dtype``, ``param_dtype``); the loss is float32.
    Returns:
      (scalar loss, {"loss", "recon", "kl"} scalars).
    """
    if recon_loss not in ("l1", "mse"):
        raise ConfigError(f"vae_loss: recon_loss = {recon_loss!r} is not implemented "
                          "(supported: ['l1', 'mse'])")
    recon, mean, logvar = AutoencoderKL(cfg, **(policy or {})).apply({"params": params}, images,
                                                                     rng)
    diff = recon - images
    rec = jnp.mean(jnp.abs(diff)) if recon_loss == "l1" else jnp.mean(jnp.square(diff))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    loss = rec + kl_weight * kl
    return loss, {"loss": loss, "recon": rec, "kl": kl}


# --------------------------------------------------------------------------- folder I/O


def load_vae(folder: str | os.PathLike) -> tuple[AutoencoderKLConfig, PyTree]:
    """Reads ``config.json`` + ``diffusion_flax_model.msgpack`` (checkpoint-layout params).

    Errors name the file and the key or tensor at fault.
    """
    return formats.load_config_and_params(folder, AutoencoderKLConfig, VAE_WEIGHTS,
                                          param_shapes, CONFIG_NAME)


def save_vae(folder: str | os.PathLike, cfg: AutoencoderKLConfig, params: PyTree) -> None:
    """Writes the diffusers Flax layout (each file atomically)."""
    formats.save_config_and_params(folder, cfg, params, VAE_WEIGHTS, param_shapes,
                                   "FlaxAutoencoderKL",
                                   CONFIG_NAME)
