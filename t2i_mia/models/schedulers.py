"""Diffusion noise schedule, forward noising, and the DDIM sampler with classifier-free guidance.

Semantics follow diffusers' ``DDIMScheduler`` (and its Flax twin): betas/alphas_cumprod in
float32, ``set_timesteps`` spacings, ``prev_t = t - T // S``, the final step's alpha from
``set_alpha_to_one``. :func:`ddim_sample` is one ``jax.lax.fori_loop`` and can live inside a
single ``jax.jit``; its eta>0 noise is drawn per image from that image's key, so a sample does
not depend on the batch it is computed in.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from t2i_mia.errors import ConfigError
from t2i_mia.models import formats

SCHEDULER_CONFIG = "scheduler_config.json"

# Keys that carry no computation for DDIM sampling or DDPM training as we do them.
_IGNORED_KEYS = frozenset({
    "_class_name", "_diffusers_version",
    "skip_prk_steps",  # PNDM's warm-up switch; Stable Diffusion 1.x folders ship PNDM configs
    "variance_type",  # DDPM ancestral sampling's variance choice; DDIM has its own
    "dynamic_thresholding_ratio", "sample_max_value",  # inert while thresholding is false
})

# Keys accepted only at the value that we implement.
_FIXED_KEYS: Mapping[str, tuple] = {
    "trained_betas": (None,),
    "thresholding": (False,),
    "rescale_betas_zero_snr": (False,),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """diffusers ``scheduler_config.json`` keys (plus the sampling defaults ``eta`` and
    ``num_inference_steps``, which our fixture's ``scheduler.json`` carries)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    eta: float = 0.0
    num_inference_steps: int = 50

    def __post_init__(self):
        _validate(dataclasses.asdict(self), type(self).__name__)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "scheduler config") -> "SchedulerConfig":
        """Raises ConfigError naming the key and value for anything we do not implement."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for key, value in d.items():
            if key in _IGNORED_KEYS or key.startswith("_"):
                continue
            if key in _FIXED_KEYS:
                if value not in _FIXED_KEYS[key] or (value is not None and not isinstance(value, bool)):
                    raise ConfigError(f"{where}: '{key}' = {value!r} is not implemented "
                                      f"(supported: {list(_FIXED_KEYS[key])})")
                continue
            if key not in fields:
                raise ConfigError(f"{where}: key '{key}' (= {value!r}) is not implemented")
            kw[key] = value
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        _validate({**defaults, **kw}, where)
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _validate(d: dict, where: str) -> None:
    rules = {
        "num_train_timesteps": lambda v: _is_int(v) and v > 1,
        "beta_start": lambda v: _is_number(v) and 0 < v < 1,
        "beta_end": lambda v: _is_number(v) and 0 < v < 1,
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "clip_sample": lambda v: isinstance(v, bool),
        "clip_sample_range": lambda v: _is_number(v) and v > 0,
        "set_alpha_to_one": lambda v: isinstance(v, bool),
        "steps_offset": lambda v: _is_int(v) and v >= 0,
        "timestep_spacing": ("leading", "trailing", "linspace"),
        "eta": lambda v: _is_number(v) and v >= 0,
        "num_inference_steps": lambda v: _is_int(v) and 0 < v <= d["num_train_timesteps"],
    }
    formats.check_config_keys(d, rules, where)


def load_scheduler_config(path: str | os.PathLike) -> SchedulerConfig:
    """Reads a ``scheduler_config.json`` (errors name the file and key)."""
    path = os.fspath(path)
    return SchedulerConfig.from_dict(formats.read_json(path), path)


def save_scheduler_config(path: str | os.PathLike, cfg: SchedulerConfig) -> None:
    formats.write_json(path, {"_class_name": "DDIMScheduler", **cfg.to_dict()})


# --------------------------------------------------------------------------- schedule


def betas(cfg: SchedulerConfig) -> jax.Array:
    """f32[T] noise variances of the forward process."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return jnp.linspace(cfg.beta_start, cfg.beta_end, T, dtype=jnp.float32)
    if cfg.beta_schedule == "scaled_linear":
        return jnp.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=jnp.float32) ** 2
    # squaredcos_cap_v2 (Nichol & Dhariwal): discretised cosine alpha-bar, betas capped at 0.999
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return jnp.asarray([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                       dtype=jnp.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> jax.Array:
    """f32[T]: prod_{s<=t} (1 - beta_s)."""
    return jnp.cumprod(1.0 - betas(cfg), axis=0)


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
    """values [B] -> [B, 1, ..., 1] broadcastable against ``like`` [B, ...]."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def add_noise(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward process q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise; t int[B]."""
    a = _per_example(alphas_cumprod[t], x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def velocity(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v-prediction target: sqrt(a_t) noise - sqrt(1 - a_t) x0; t int[B]."""
    a = _per_example(alphas_cumprod[t], x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0


def training_target(cfg: SchedulerConfig, alphas_cumprod: jax.Array, x0: jax.Array,
                    noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the denoiser regresses on under ``cfg.prediction_type`` (noise, v, or x0)."""
    if cfg.prediction_type == "epsilon":
        return noise
    if cfg.prediction_type == "v_prediction":
        return velocity(alphas_cumprod, x0, noise, t)
    return x0


def ddim_timesteps(cfg: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """int32[S] timesteps, descending, as diffusers ``DDIMScheduler.set_timesteps``."""
    T, S = cfg.num_train_timesteps, num_inference_steps
    if not (_is_int(S) and 0 < S <= T):
        raise ConfigError(f"num_inference_steps = {S!r} must be an integer in [1, {T}] "
                          "(num_train_timesteps)")
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, S).round()[::-1].astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, S) * (T // S)).round()[::-1].astype(np.int64) + cfg.steps_offset
    else:  # trailing
        ts = np.round(np.arange(T, 0, -T / S)).astype(np.int64) - 1
    if ts.max() >= T:
        raise ConfigError(f"steps_offset = {cfg.steps_offset} puts timestep {int(ts.max())} beyond "
                          f"num_train_timesteps = {T}")
    return ts.astype(np.int32)


# --------------------------------------------------------------------------- sampling


EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def ddim_step(eps_fn: EpsFn, cfg: SchedulerConfig, x: jax.Array, i: jax.Array | int,
              context: jax.Array, guided: bool, guidance_scale: float | jax.Array,
              timesteps: jax.Array, eta: float | jax.Array = 0.0,
              noise_keys: jax.Array | None = None,
              acp: jax.Array | None = None) -> jax.Array:
    """One DDIM step x_{t_i} -> x_{t_{i+1}}: the body of :func:`ddim_sample`'s loop.

    ``context`` is f32[B,L,D], or with ``guided`` f32[2B,L,D] = [uncond; cond] (the model
    then runs once on [x; x]). ``i`` indexes ``timesteps`` int32[S] and may be traced; the
    other arguments are as in :func:`ddim_sample`. ``acp``: :func:`alphas_cumprod` of
    ``cfg``, computed once by a caller that loops (None: computed here).
    """
    acp = alphas_cumprod(cfg) if acp is None else acp
    final_acp = jnp.float32(1.0) if cfg.set_alpha_to_one else acp[0]
    stride = cfg.num_train_timesteps // timesteps.shape[0]
    B = x.shape[0]
    t = timesteps[i]
    if not guided:
        out = eps_fn(x, jnp.full((B,), t, jnp.int32), context)
    else:
        out2 = eps_fn(jnp.concatenate([x, x], axis=0), jnp.full((2 * B,), t, jnp.int32), context)
        out_u, out_c = out2[:B], out2[B:]
        out = out_u + guidance_scale * (out_c - out_u)
    a_t = acp[t]
    prev_t = t - stride
    a_prev = jnp.where(prev_t >= 0, acp[jnp.maximum(prev_t, 0)], final_acp)
    b_t = 1.0 - a_t
    if cfg.prediction_type == "epsilon":
        x0 = (x - b_t ** 0.5 * out) / a_t ** 0.5
        eps = out
    elif cfg.prediction_type == "v_prediction":
        x0 = a_t ** 0.5 * x - b_t ** 0.5 * out
        eps = a_t ** 0.5 * out + b_t ** 0.5 * x
    else:  # sample
        x0 = out
        eps = (x - a_t ** 0.5 * x0) / b_t ** 0.5
    if cfg.clip_sample:
        x0 = jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
    variance = ((1.0 - a_prev) / b_t) * (1.0 - a_t / a_prev)
    std = eta * variance ** 0.5
    x_prev = a_prev ** 0.5 * x0 + (1.0 - a_prev - std ** 2) ** 0.5 * eps
    if noise_keys is not None:
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:],
                                                     x.dtype))(noise_keys)
        x_prev = x_prev + std * noise
    return x_prev


def ddim_sample(eps_fn: EpsFn, cfg: SchedulerConfig, latents: jax.Array, cond: jax.Array,
                uncond: jax.Array | None, guidance_scale: float | jax.Array, timesteps: jax.Array,
                eta: float | jax.Array = 0.0, noise_keys: jax.Array | None = None) -> jax.Array:
    """DDIM from ``latents`` (x_T) to x_0, the whole loop one ``jax.lax.fori_loop``.

    Args:
      eps_fn: ``(x f32[N,h,w,C], t int32[N], context f32[N,L,D]) -> model output f32[N,h,w,C]``
        (noise, v or x0 per ``cfg.prediction_type``), e.g. a U-Net apply closed over params.
      latents: f32[B,h,w,C] starting noise (scaled latents).
      cond: f32[B,L,D] text context.
      uncond: f32[B,L,D] unconditional context, or None for no guidance. With it, the model
        runs once per step on the batch [uncond; cond] (2B) and the output is
        ``uncond + guidance_scale * (cond - uncond)``.
      guidance_scale: scalar (may be traced).
      timesteps: int32[S] descending (see :func:`ddim_timesteps`); S is static.
      eta: DDIM stochasticity (0: deterministic). May be traced.
      noise_keys: [B] PRNG keys, one per image; step i draws the image's noise from
        ``fold_in(noise_keys[b], i)``. Required unless eta is the Python number 0.
    Returns:
      f32[B,h,w,C] final latents.
    """
    if noise_keys is None and not (isinstance(eta, (int, float)) and eta == 0):
        raise ConfigError("ddim_sample: eta may be non-zero, so noise_keys (one key per image) "
                          "are required")
    timesteps = jnp.asarray(timesteps, jnp.int32)
    S = timesteps.shape[0]
    context = cond if uncond is None else jnp.concatenate([uncond, cond], axis=0)
    acp = alphas_cumprod(cfg)  # once, outside the loop

    def body(i, x):
        return ddim_step(eps_fn, cfg, x, i, context, uncond is not None, guidance_scale,
                         timesteps, eta, noise_keys, acp)

    return jax.lax.fori_loop(0, S, body, latents)
