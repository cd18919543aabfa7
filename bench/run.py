#!/usr/bin/env python
"""t2i-mia benchmark suite: throughput of the pieces an audit spends its time in.

    python bench/run.py [--quick] [--only NAME,...] [--json FILE] [--audit-report PATH]
                        [--scale ci|tiny|paper] [--dtype float32|bfloat16]
                        [--batch N] [--repeats R]

Benchmarks (``--only`` names):

* ``ldm_train``: one LDM train step (U-Net + CLIP text encoder, adamw, the project's
  ``make_train_step``/``jit_train_step``), examples/s.
* ``ddim``: DDIM sampling images/s, text encoding + guided DDIM loop + VAE decode to uint8:
  the whole loop in one jit (``schedulers.ddim_sample``'s ``fori_loop``, as ``LDMTarget``
  does) vs a jitted single DDIM step (U-Net with guidance + scheduler update) called from a
  Python loop without host syncs between steps (text encoding and decoding jitted too).
* ``dallebart_decode``: DalleBart image-token decoding tokens/s with the KV cache
  (``generate``) vs recomputing the whole prefix each step (``generate_full_prefix``).
* ``features``: attack feature extraction (pixel + semantic + faithfulness through the
  audit's own ``attack_features`` with a small CLIP), queries/s.
* ``mlp_vs_sklearn``: ``MLPAttack`` vs scikit-learn's ``MLPClassifier``, same architecture,
  epochs, batch size and Adam settings, no early stopping on either; fit time with and
  without compilation, held-out AUC.
* ``audit``: per-phase timings of an audit: from ``--audit-report`` if given, else a ``ci``
  preset audit run in a temporary folder (not in ``--quick`` mode).

Timing: every measured function is called once first ("first call": compilation + one run,
timed on its own; where the program is compiled ahead of time the compile time is reported
separately too), then R more times; each call ends with ``jax.block_until_ready`` and the
figure is the median of those R calls (fewer when the calls would overrun the time budget).
A figure that cannot be measured is ``null`` with a ``reason``. Results go to stdout as a
table and, with ``--json``, to a JSON file with the machine, backend, device count and kind,
versions and the configuration of every benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flops as flops_lib  # noqa: E402  (bench/flops.py)
import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import t2i_mia  # noqa: E402
from t2i_mia.config import get_config  # noqa: E402

SCHEMA_VERSION = 1
BENCHMARKS = ("ldm_train", "ddim", "dallebart_decode", "features", "mlp_vs_sklearn", "audit")
SCALES = ("ci", "tiny", "paper")
PyTree = Any


# ----------------------------------------------------------------------------- results

@dataclasses.dataclass
class Result:
    """One benchmark: its configuration and figures ``{name: {value, unit[, reason]}}``."""
    name: str
    config: dict = dataclasses.field(default_factory=dict)
    figures: dict = dataclasses.field(default_factory=dict)
    status: str = "ok"  # ok | skipped | error
    reason: str | None = None

    def add(self, key: str, value: float | int | None, unit: str, reason: str | None = None):
        """A figure; non-finite values become null with a reason."""
        if value is not None:
            value = float(value)
            if not math.isfinite(value):
                reason, value = f"non-finite measurement ({value})", None
        if value is None and not reason:
            raise ValueError(f"{self.name}.{key}: a null figure needs a reason")
        fig = {"value": value, "unit": unit}
        if value is None:
            fig["reason"] = reason
        self.figures[key] = fig

    def add_timing(self, prefix: str, t: "Timing", per_call: float, unit: str,
                   per_call_name: str):
        """``<prefix>first_call_s``, ``<prefix>steady_s`` and ``<prefix><per_call_name>`` =
        per_call / steady."""
        if t.compile_s is not None:
            self.add(f"{prefix}compile_s", t.compile_s, "s")
        self.add(f"{prefix}first_call_s", t.first_call_s, "s")
        self.add(f"{prefix}steady_s", t.steady_s, "s")
        self.add(f"{prefix}steady_repeats", len(t.runs_s), "calls")
        self.add(f"{prefix}{per_call_name}", per_call / t.steady_s, unit)

    def to_json(self) -> dict:
        d = {"status": self.status, "config": self.config, "figures": self.figures}
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclasses.dataclass
class Timing:
    compile_s: float | None  # ahead-of-time lower + compile, where measured apart
    first_call_s: float      # compile (if not done ahead) + the first run
    runs_s: list[float]      # steady-state calls

    @property
    def steady_s(self) -> float:
        return statistics.median(self.runs_s)


@dataclasses.dataclass
class Ctx:
    """Options shared by every benchmark."""
    quick: bool
    scale: str
    dtype: Any
    batch: int | None
    repeats: int
    budget_s: float  # wall-clock budget of the steady repeats of one measured function
    audit_report: str | None

    @property
    def dtype_name(self) -> str:
        return jnp.dtype(self.dtype).name


def _block(x):
    return jax.block_until_ready(x)


def measure(call: Callable[[], Any], ctx: Ctx, compile_s: float | None = None) -> Timing:
    """Times ``call()`` once (first call) then up to ``ctx.repeats`` times (steady state),
    stopping early when the next call would overrun ``ctx.budget_s``; >= 1 steady call."""
    t0 = time.perf_counter()
    _block(call())
    first = time.perf_counter() - t0
    runs: list[float] = []
    while len(runs) < ctx.repeats:
        t0 = time.perf_counter()
        _block(call())
        runs.append(time.perf_counter() - t0)
        if sum(runs) + runs[-1] > ctx.budget_s:
            break
    return Timing(compile_s, (compile_s or 0.0) + first, runs)


def measure_interleaved(calls: dict[str, Callable[[], Any]], ctx: Ctx,
                        compile_s: dict[str, float] | None = None) -> dict[str, Timing]:
    """As :func:`measure` for several variants of the same work, their steady calls
    interleaved (A, B, A, B, ...) so a change in machine load hits every variant alike: the
    ratios stay fair on a shared machine. The budget covers all variants together."""
    compile_s = compile_s or {}
    first, runs = {}, {k: [] for k in calls}
    for k, call in calls.items():
        t0 = time.perf_counter()
        _block(call())
        first[k] = time.perf_counter() - t0
    while len(runs[next(iter(calls))]) < ctx.repeats:
        for k, call in calls.items():
            t0 = time.perf_counter()
            _block(call())
            runs[k].append(time.perf_counter() - t0)
        spent = sum(sum(r) for r in runs.values())
        last = sum(r[-1] for r in runs.values())
        if spent + last > ctx.budget_s:
            break
    return {k: Timing(compile_s.get(k), compile_s.get(k, 0.0) + first[k], runs[k])
            for k in calls}


def aot_compile(jitted, *args) -> tuple[Any, float]:
    """(compiled, seconds to lower + compile)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def add_utilization(res: Result, flops: float | None, seconds: float, ctx: Ctx,
                    prefix: str = ""):
    dev = jax.devices()[0]
    u = flops_lib.utilization(flops, seconds, dev.platform, dev.device_kind, ctx.dtype)
    (achieved, why_a), (mfu, why_m) = u["tflops_per_s"], u["mfu"]
    res.add(f"{prefix}achieved_tflops_per_s", achieved, "TFLOP/s", why_a)
    res.add(f"{prefix}mfu", mfu, "fraction of peak", why_m)


# ----------------------------------------------------------------------------- helpers

def preset(ctx: Ctx, target: str = "ldm"):
    name = {"ci": "ci", "tiny": "tiny", "paper": "paper-ldm" if target == "ldm"
            else "paper-dalle"}[ctx.scale]
    return get_config(name)


def single_device_mesh():
    from t2i_mia.parallel.mesh import make_mesh
    return make_mesh(devices=jax.devices()[:1])


def random_params(shapes: PyTree, seed: int) -> PyTree:
    """Random f32 parameters for a tree of ShapeDtypeStructs, drawn on device by one small
    jitted program (one normal draw, sliced): no model-init compilation, which for large
    models costs more than the benchmark. Kernels ~ N(0, 1/fan_in), embeddings N(0, 0.02^2),
    norm scales 1, biases 0, CLIP's logit_scale log(1/0.07)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [int(np.prod(s.shape, dtype=np.int64)) for _, s in leaves]
    total = max(1, sum(sizes))

    def name_of(path) -> str:
        k = path[-1]
        return str(getattr(k, "key", getattr(k, "name", k)))

    def draw(key):
        z = jax.random.normal(key, (total,), jnp.float32)
        out, off = [], 0
        for (path, s), n in zip(leaves, sizes):
            name, shape = name_of(path), tuple(s.shape)
            if name == "scale":
                v = jnp.ones(shape, jnp.float32)
            elif name == "bias":
                v = jnp.zeros(shape, jnp.float32)
            elif name == "logit_scale":
                v = jnp.full(shape, math.log(1 / 0.07), jnp.float32)
            else:
                fan_in = int(np.prod(shape[:-1])) if name == "kernel" and len(shape) > 1 else 0
                std = 1.0 / math.sqrt(fan_in) if fan_in else 0.02
                v = (z[off: off + n] * std).reshape(shape)
            out.append(v)
            off += n
        return jax.tree_util.tree_unflatten(treedef, out)

    return jax.jit(draw)(jax.random.PRNGKey(seed))


def n_params(tree: PyTree) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def random_ids(rng: np.random.Generator, batch: int, length: int, vocab: int) -> np.ndarray:
    return rng.integers(0, vocab, size=(batch, length), dtype=np.int32)


# ----------------------------------------------------------------------------- ldm_train

def bench_ldm_train(ctx: Ctx) -> Result:
    from t2i_mia.models import schedulers, unet as unet_lib
    from t2i_mia.models.clip import CLIPTextConfig, CLIPTextModel
    from t2i_mia.training.ldm_train import ldm_loss, make_optimizer
    from t2i_mia.training.loop import create_train_state, jit_train_step, make_train_step

    cfg = preset(ctx)
    L = cfg.ldm
    unet_cfg = unet_lib.UNet2DConditionConfig.from_dict(L.unet)
    text_cfg = CLIPTextConfig.from_dict(L.text_encoder)
    sched_cfg = schedulers.SchedulerConfig.from_dict(L.scheduler)
    bs = ctx.batch or (32 if ctx.scale == "paper" else L.train.batch_size)
    s, length = unet_cfg.sample_size, L.max_text_length
    res = Result("ldm_train", config={
        "preset": cfg.preset, "unet": L.unet, "text_encoder": L.text_encoder,
        "batch_size": bs, "latent_shape": [s, s, unet_cfg.in_channels], "text_length": length,
        "dtype": ctx.dtype_name, "optimizer": "adamw (make_optimizer of ldm.train)",
        "caption_dropout": L.caption_dropout, "timestep_power": L.timestep_power,
        "mesh": "1 device"})
    mesh = single_device_mesh()
    unet_shapes = unet_lib.param_shapes(unet_cfg)
    text_shapes = jax.eval_shape(
        lambda k: CLIPTextModel(text_cfg).init(k, jnp.zeros((1, length), jnp.int32))["params"],
        jax.random.PRNGKey(0))
    params = random_params({"unet": unet_shapes, "text": text_shapes}, 0)
    res.config["n_params"] = n_params(params)
    tx = make_optimizer(L.train)
    state = create_train_state(params, tx, 1)
    u_ids = jnp.zeros((length,), jnp.int32)
    u_mask = jnp.zeros((length,), jnp.int32).at[:2].set(1)
    dtype = ctx.dtype

    # train_ldm's loss under the precision policy: compute in ctx.dtype, float32 parameters
    policy = {"dtype": dtype, "param_dtype": jnp.float32}

    def loss_fn(p, batch, rng):
        return ldm_loss(unet_cfg, text_cfg, sched_cfg, p, batch, rng, uncond_ids=u_ids,
                        uncond_mask=u_mask, caption_dropout=L.caption_dropout,
                        timestep_power=L.timestep_power, policy=policy)

    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((bs, s, s, unet_cfg.in_channels), np.float32),
             "ids": random_ids(rng, bs, length, text_cfg.vocab_size),
             "mask": np.ones((bs, length), np.int32)}
    step = jit_train_step(make_train_step(loss_fn, tx), mesh, state, batch)
    state = step.place(state)
    batch = jax.device_put(batch, step.batch_shardings)
    compiled, compile_s = aot_compile(step.jitted, state, batch)
    flops = flops_lib.flops_of(compiled)
    holder = {"state": state, "loss": None}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        holder["loss"] = metrics["loss"]
        return holder["state"], metrics

    t = measure(call, ctx, compile_s)
    res.add_timing("", t, bs, "examples/s", "examples_per_s")
    res.add("final_loss", float(holder["loss"]), "loss")
    res.add("flops_per_step", flops, "FLOP", None if flops else "XLA gave no FLOP count")
    add_utilization(res, flops, t.steady_s, ctx)
    return res


# ----------------------------------------------------------------------------- ddim

def bench_ddim(ctx: Ctx) -> Result:
    from t2i_mia.models import autoencoder_kl, schedulers, unet as unet_lib
    from t2i_mia.models.clip import CLIPTextConfig, CLIPTextModel
    from t2i_mia.targets.ldm import to_uint8

    cfg = preset(ctx)
    L = cfg.ldm
    unet_cfg = unet_lib.UNet2DConditionConfig.from_dict(L.unet)
    text_cfg = CLIPTextConfig.from_dict(L.text_encoder)
    vae_cfg = autoencoder_kl.AutoencoderKLConfig.from_dict(L.vae)
    sched = schedulers.SchedulerConfig.from_dict(L.scheduler)
    S = L.sample.num_inference_steps
    g = float(L.sample.guidance_scale)
    bs = ctx.batch or {"ci": 8, "tiny": 32, "paper": 16}[ctx.scale]
    size = vae_cfg.sample_size
    f = vae_cfg.downsample_factor
    lat_shape = (size // f, size // f, unet_cfg.in_channels)
    length = L.max_text_length
    res = Result("ddim", config={
        "preset": cfg.preset, "batch_size": bs, "image_size": size, "latent_shape": list(lat_shape),
        "num_inference_steps": S, "guidance_scale": g, "eta": 0.0, "dtype": ctx.dtype_name,
        "prediction_type": sched.prediction_type,
        "unet": L.unet, "vae": L.vae, "text_encoder": L.text_encoder,
        "includes": "text encoding, guided DDIM loop, VAE decode to uint8 (both variants)",
        "mesh": "1 device"})
    policy = {"dtype": ctx.dtype, "param_dtype": jnp.float32}  # the precision policy
    text = CLIPTextModel(text_cfg, **policy)
    unet = unet_lib.UNet2DConditionModel(unet_cfg, **policy)
    vae = autoencoder_kl.AutoencoderKL(vae_cfg, **policy)
    shapes = {
        "unet": unet_lib.param_shapes(unet_cfg),
        "text": jax.eval_shape(lambda k: text.init(k, jnp.zeros((1, length), jnp.int32))["params"],
                               jax.random.PRNGKey(0)),
        "vae": autoencoder_kl.param_shapes(vae_cfg),
    }
    params = random_params(shapes, 0)  # float32 parameters; the models compute in ctx.dtype
    res.config["n_params"] = n_params(params)
    timesteps = jnp.asarray(schedulers.ddim_timesteps(sched, S))
    acp = schedulers.alphas_cumprod(sched)
    scale = vae_cfg.scaling_factor
    u_ids = jnp.zeros((length,), jnp.int32)
    u_mask = jnp.zeros((length,), jnp.int32).at[:2].set(1)

    def eps_fn(p, x, t, context):
        return unet.apply({"params": p["unet"]}, x, t, context)

    def encode(p, ids, mask, keys):
        ctx_c = text.apply({"params": p["text"]}, ids, mask)[0]
        ctx_u = text.apply({"params": p["text"]}, jnp.broadcast_to(u_ids, ids.shape),
                           jnp.broadcast_to(u_mask, mask.shape))[0]
        x = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), lat_shape))(keys)
        return ctx_c, ctx_u, x

    def decode(p, z):
        return to_uint8(vae.apply({"params": p["vae"]}, z / scale, method="decode"))

    def one_jit(p, ids, mask, keys):  # LDMTarget's sampler, on one device
        ctx_c, ctx_u, x = encode(p, ids, mask, keys)
        z0 = schedulers.ddim_sample(lambda x, t, c: eps_fn(p, x, t, c), sched, x, ctx_c, ctx_u,
                                    g, timesteps, 0.0, None)
        return decode(p, z0)

    def encode2(p, ids, mask, keys):
        ctx_c, ctx_u, x = encode(p, ids, mask, keys)
        return jnp.concatenate([ctx_u, ctx_c]), x

    def step(p, x, i, context2):  # one DDIM step (eta = 0): ddim_sample's loop body
        return schedulers.ddim_step(lambda x, t, c: eps_fn(p, x, t, c), sched, x, i, context2,
                                    True, g, timesteps, acp=acp)

    rng = np.random.default_rng(0)
    ids = jnp.asarray(random_ids(rng, bs, length, text_cfg.vocab_size))
    mask = jnp.ones((bs, length), jnp.int32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(bs))

    compiled, compile_s = aot_compile(jax.jit(one_jit), params, ids, mask, keys)
    out_a = {}

    def call_one():
        out_a["img"] = compiled(params, ids, mask, keys)
        return out_a["img"]

    encode_j, step_j, decode_j = jax.jit(encode2), jax.jit(step), jax.jit(decode)
    step_idx = [jnp.int32(i) for i in range(S)]  # on device once: no transfer per step
    out_b = {}

    def call_loop():
        context2, x = encode_j(params, ids, mask, keys)
        for i in step_idx:
            x = step_j(params, x, i, context2)
        out_b["img"] = decode_j(params, x)
        return out_b["img"]

    tm = measure_interleaved({"one_jit": call_one, "loop": call_loop}, ctx,
                             {"one_jit": compile_s})
    t_one, t_loop = tm["one_jit"], tm["loop"]
    res.add_timing("one_jit_", t_one, bs, "images/s", "images_per_s")
    res.add_timing("python_loop_", t_loop, bs, "images/s", "images_per_s")
    res.add("speedup_one_jit_vs_python_loop", t_loop.steady_s / t_one.steady_s, "x")
    diff = np.abs(np.asarray(out_a["img"], np.int32) - np.asarray(out_b["img"], np.int32))
    res.add("max_abs_diff_uint8", int(diff.max()), "uint8 levels (one-jit vs loop images)")
    # a spread of pixel values shows the comparison above is not between two blank images
    res.add("images_std_uint8", float(np.asarray(out_a["img"], np.float32).std()), "uint8 levels")

    # FLOPs: the loop's pieces counted apart (XLA counts the fori_loop body once).
    ctx2_s, x_s = jax.eval_shape(encode2, params, ids, mask, keys)
    f_enc = flops_lib.flops_of(encode_j.lower(params, ids, mask, keys))
    f_step = flops_lib.flops_of(step_j.lower(params, x_s, step_idx[0], ctx2_s))
    f_dec = flops_lib.flops_of(decode_j.lower(params, x_s))
    total = None
    if None not in (f_enc, f_step, f_dec):
        total = flops_lib.loop_flops(f_step, S, f_enc + f_dec)
    res.add("flops_per_image", total / bs if total else None, "FLOP",
            None if total else "XLA gave no FLOP count")
    add_utilization(res, total, t_one.steady_s, ctx, prefix="one_jit_")
    return res


# ----------------------------------------------------------------------------- dallebart

def _dalle_sizes(ctx: Ctx) -> dict:
    if ctx.scale == "ci":
        return dict(d_model=64, layers=2, heads=4, ffn=128, image_vocab=256, text_vocab=512,
                    text_length=16, lengths=(64,), batch=2)
    if ctx.scale == "tiny":
        return dict(d_model=256, layers=4, heads=4, ffn=683, image_vocab=4096,
                    text_vocab=4096, text_length=64, lengths=(64, 256), batch=1)
    return dict(d_model=1024, layers=12, heads=16, ffn=2730, image_vocab=16384,
                text_vocab=50264, text_length=64, lengths=(256,), batch=8)


def bench_dallebart_decode(ctx: Ctx) -> Result:
    from t2i_mia.models import dallebart as db

    z = _dalle_sizes(ctx)
    bs = ctx.batch or z["batch"]
    cond_scale = 10.0
    res = Result("dallebart_decode", config={
        "d_model": z["d_model"], "encoder_layers": z["layers"], "decoder_layers": z["layers"],
        "attention_heads": z["heads"], "ffn_dim": z["ffn"], "image_vocab_size": z["image_vocab"],
        "encoder_vocab_size": z["text_vocab"], "text_length": z["text_length"],
        "image_lengths": list(z["lengths"]), "batch_size": bs,
        "condition_scale": cond_scale, "sampling": "categorical, no top-k/top-p",
        "dtype": ctx.dtype_name,
        "shape_note": "dalle-mini layout (GLU, NormFormer); sizes scaled to the backend"})
    rng = np.random.default_rng(0)
    L = z["text_length"]
    ids = random_ids(rng, bs, L, z["text_vocab"])
    mask = np.ones((bs, L), np.int32)
    u_ids = np.zeros((1, L), np.int32)
    u_mask = np.zeros((1, L), np.int32)
    u_mask[0, :2] = 1
    keys = np.asarray(jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(1), i))(
        jnp.arange(bs)))
    longest = max(z["lengths"])
    for n in z["lengths"]:
        cfg = db.DalleBartConfig(
            d_model=z["d_model"], encoder_layers=z["layers"], decoder_layers=z["layers"],
            encoder_attention_heads=z["heads"], decoder_attention_heads=z["heads"],
            encoder_ffn_dim=z["ffn"], decoder_ffn_dim=z["ffn"],
            image_vocab_size=z["image_vocab"], encoder_vocab_size=z["text_vocab"],
            image_length=n, max_text_length=L, dropout=0.0)
        shapes = jax.eval_shape(lambda k: db.init_dallebart(cfg, k), jax.random.PRNGKey(0))
        params = random_params(shapes, n)
        res.config[f"n_params_{n}"] = n_params(params)
        kw = dict(uncond_input_ids=u_ids, uncond_attention_mask=u_mask,
                  condition_scale=cond_scale, dtype=ctx.dtype)
        out = {}

        def cached():
            out["cached"] = db.generate(params, cfg, ids, mask, keys, **kw)
            return out["cached"]

        def full():
            out["full"] = db.generate_full_prefix(params, cfg, ids, mask, keys, **kw)
            return out["full"]

        tm = measure_interleaved({"cached": cached, "full": full}, ctx)
        t_c, t_f = tm["cached"], tm["full"]
        tokens = bs * n
        res.add_timing(f"kv_cache_{n}_", t_c, tokens, "tokens/s", "tokens_per_s")
        res.add_timing(f"full_prefix_{n}_", t_f, tokens, "tokens/s", "tokens_per_s")
        res.add(f"speedup_kv_cache_{n}", t_f.steady_s / t_c.steady_s, "x")
        agree = float(np.mean(np.asarray(out["cached"]) == np.asarray(out["full"])))
        res.add(f"token_agreement_{n}", agree, "fraction (cache vs full prefix)")

        if n == longest:  # FLOPs per image of each variant, from its pieces
            model = db.DalleBart(cfg, dtype=ctx.dtype)
            rows = 2 * bs  # conditional + unconditional rows
            v = {"params": params}
            ids2 = jax.ShapeDtypeStruct((rows, L), jnp.int32)
            enc_f = lambda p, i, m: model.apply({"params": p}, i, m,  # noqa: E731
                                                method=db.DalleBart.encode)
            enc_s = jax.eval_shape(enc_f, params, ids2, ids2)
            cache_s = jax.eval_shape(lambda e, m: model.apply(v, e, m,
                                                              method=db.DalleBart.init_cache),
                                     enc_s, ids2)
            tok = jax.ShapeDtypeStruct((rows, 1), jnp.int32)
            prefix = jax.ShapeDtypeStruct((rows, n), jnp.int32)
            f_enc = flops_lib.jit_flops(enc_f, params, ids2, ids2)
            f_init = flops_lib.jit_flops(
                lambda p, e, m: model.apply({"params": p}, e, m, method=db.DalleBart.init_cache),
                params, enc_s, ids2)
            f_step = flops_lib.jit_flops(
                lambda p, t, c: model.apply({"params": p}, t, cache=c,
                                            method=db.DalleBart.decode), params, tok, cache_s)
            f_full = flops_lib.jit_flops(
                lambda p, x, e, m: model.apply({"params": p}, x, e, m,
                                               method=db.DalleBart.decode),
                params, prefix, enc_s, ids2)
            if None in (f_enc, f_init, f_step, f_full):
                why = "XLA gave no FLOP count"
                for k in ("flops_per_token_kv_cache", "flops_per_token_full_prefix"):
                    res.add(f"{k}_{n}", None, "FLOP", why)
                add_utilization(res, None, t_c.steady_s, ctx, prefix=f"kv_cache_{n}_")
            else:
                cached_total = flops_lib.loop_flops(f_step, n, f_enc + f_init)
                full_total = flops_lib.loop_flops(f_full, n, f_enc)
                res.add(f"flops_per_token_kv_cache_{n}", cached_total / tokens, "FLOP")
                res.add(f"flops_per_token_full_prefix_{n}", full_total / tokens, "FLOP")
                res.add(f"flop_ratio_full_prefix_vs_kv_cache_{n}", full_total / cached_total,
                        "x")
                add_utilization(res, cached_total, t_c.steady_s, ctx, prefix=f"kv_cache_{n}_")
                add_utilization(res, full_total, t_f.steady_s, ctx, prefix=f"full_prefix_{n}_")
    return res


# ----------------------------------------------------------------------------- features

def bench_features(ctx: Ctx) -> Result:
    from t2i_mia.adversary import features as F
    from t2i_mia.adversary.features import attack_features
    from t2i_mia.pipeline.audit import QuerySet
    from t2i_mia.adversary.encoder import Encoder
    from t2i_mia.data.synthetic import SyntheticCaptions
    from t2i_mia.models.clip import CLIPConfig, CLIPModel
    from t2i_mia.models.tokenizer import TextTokenizer

    cfg = preset(ctx)
    enc_cfg = cfg.adversary.encoder
    clip_cfg = CLIPConfig.from_dict(enc_cfg.clip)
    k = 4
    n = ctx.batch or {"ci": 32, "tiny": 256, "paper": 256}[ctx.scale]
    size = cfg.data.image_size
    res = Result("features", config={
        "preset": cfg.preset, "queries": n, "k": k, "image_size": size, "clip": enc_cfg.clip,
        "path": "t2i_mia.adversary.features.attack_features (pixel + semantic + faithfulness), "
                "results on the host", "mesh": "1 device"})
    data = SyntheticCaptions(seed=0, size=size, n=n)
    images, captions = data.get_many(list(range(n)))
    tok = TextTokenizer.train(captions, vocab_size=enc_cfg.vocab_size,
                              max_length=enc_cfg.max_text_length)
    v = clip_cfg.vision_config
    shapes = jax.eval_shape(
        lambda key: CLIPModel(clip_cfg).init(
            key, jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32),
            jnp.zeros((1, clip_cfg.text_config.max_position_embeddings), jnp.int32))["params"],
        jax.random.PRNGKey(0))
    params = random_params(shapes, 0)
    res.config["clip_n_params"] = n_params(params)
    encoder = Encoder(clip_cfg, params, tok, single_device_mesh())
    rng = np.random.default_rng(0)
    gen = jnp.asarray(rng.integers(0, 256, size=(n, k, size, size, 3), dtype=np.uint8))
    qs = QuerySet("bench", np.arange(n, dtype=np.int64), images, captions,
                  np.r_[np.ones(n // 2), np.zeros(n - n // 2)].astype(np.int32))
    out = {}

    def call_all():
        out["f"] = attack_features(encoder, qs.images, gen, captions)
        return 0

    t_all = measure(call_all, ctx)
    q_dev = jnp.asarray(images)
    t_pix = measure(lambda: F.pixel_features(F.to_unit_float(q_dev), F.to_unit_float(gen)), ctx)
    res.add_timing("all_", t_all, n, "queries/s", "queries_per_s")
    res.add("all_generated_images_per_s", n * k / t_all.steady_s, "images/s")
    res.add_timing("pixel_only_", t_pix, n, "queries/s", "queries_per_s")
    res.add("n_features", sum(1 if np.ndim(a) == 1 else np.shape(a)[1]
                              for a in out["f"].values()), "columns")
    return res


# ----------------------------------------------------------------------------- mlp

def synthetic_membership(n: int, n_features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features with a nonlinear membership signal (AUC well between 0.5 and 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_features)).astype(np.float32)
    logit = 1.0 * x[:, 0] - 0.8 * x[:, 1] + 1.5 * x[:, 2] * x[:, 3] + 0.8 * np.sin(2 * x[:, 4])
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return x, y


def bench_mlp_vs_sklearn(ctx: Ctx) -> Result:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    from t2i_mia.adversary.classifiers import MLPAttack
    from t2i_mia.adversary.metrics import roc_auc

    n_train = ctx.batch or {"ci": 2000, "tiny": 10000, "paper": 50000}[ctx.scale]
    n_test = max(1000, n_train // 2)
    n_features, hidden, batch, lr = 32, (64, 64), 64, 1e-3
    epochs = {"ci": 10, "tiny": 30, "paper": 20}[ctx.scale]
    res = Result("mlp_vs_sklearn", config={
        "rows_train": n_train, "rows_test": n_test, "features": n_features,
        "hidden": list(hidden), "epochs": epochs, "batch_size": batch, "adam_lr": lr,
        "adam_betas": [0.9, 0.999], "adam_eps": 1e-8, "l2_or_weight_decay": 0.0,
        "early_stopping": "none on both (MLPAttack val_fraction=0; sklearn "
                          "early_stopping=False, tol=0, n_iter_no_change=epochs)",
        "standardisation": "MLPAttack internal; StandardScaler for sklearn",
        "data": "synthetic: y ~ Bernoulli(sigmoid(x0 - 0.8 x1 + 1.5 x2 x3 + 0.8 sin 2x4))"})
    x, y = synthetic_membership(n_train + n_test, n_features, seed=0)
    x_tr, y_tr, x_te, y_te = x[:n_train], y[:n_train], x[n_train:], y[n_train:]

    def ours(seed=0):
        return MLPAttack(hidden=hidden, lr=lr, weight_decay=0.0, batch_size=batch,
                         max_epochs=epochs, patience=epochs, val_fraction=0.0, seed=seed)

    t0 = time.perf_counter()
    first = ours().fit(x_tr, y_tr)
    first_s = time.perf_counter() - t0
    fitted = {}

    def refit():  # same shapes and settings: the jitted fit is reused, no compilation
        fitted["m"] = ours().fit(x_tr, y_tr)
        return 0

    scaler = StandardScaler().fit(x_tr)
    xs_tr, xs_te = scaler.transform(x_tr), scaler.transform(x_te)

    def sk_fit():
        clf = MLPClassifier(hidden_layer_sizes=hidden, activation="relu", solver="adam",
                            alpha=0.0, batch_size=batch, learning_rate_init=lr, max_iter=epochs,
                            shuffle=True, random_state=0, tol=0.0, early_stopping=False,
                            n_iter_no_change=epochs, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fitted["sk"] = clf.fit(xs_tr, y_tr)
        return 0

    # ours is compiled by now: its first call here is not reported
    tm = measure_interleaved({"ours": refit, "sklearn": sk_fit}, ctx)
    t_ours, t_sk = tm["ours"], tm["sklearn"]
    res.add("ours_fit_first_s", first_s, "s (compile + fit)")
    res.add("ours_fit_s", t_ours.steady_s, "s (no compile, median)")
    res.add("ours_fit_repeats", len(t_ours.runs_s), "fits")
    res.add("sklearn_fit_s", t_sk.steady_s, "s (median)")
    res.add("sklearn_fit_repeats", len(t_sk.runs_s), "fits")
    res.add("speedup_vs_sklearn_no_compile", t_sk.steady_s / t_ours.steady_s, "x")
    res.add("speedup_vs_sklearn_with_compile", t_sk.steady_s / first_s, "x")
    res.add("ours_epochs_run", fitted["m"].epochs_run_, "epochs")
    res.add("sklearn_epochs_run", fitted["sk"].n_iter_, "epochs")
    res.add("ours_auc", roc_auc(first.score(x_te), y_te), "AUC (held out)")
    res.add("sklearn_auc", roc_auc(fitted["sk"].predict_proba(xs_te)[:, 1], y_te),
            "AUC (held out)")
    return res


# ----------------------------------------------------------------------------- audit

def bench_audit(ctx: Ctx) -> Result:
    res = Result("audit")
    if ctx.audit_report:
        with open(ctx.audit_report, encoding="utf-8") as f:
            report = json.load(f)
        if not isinstance(report.get("timings_s"), dict):
            raise ValueError(f"{ctx.audit_report}: no 'timings_s' object (not a report.json)")
        timings = report["timings_s"]
        res.config = {"source": os.path.abspath(ctx.audit_report),
                      "preset": (report.get("config") or {}).get("preset"),
                      "target": report.get("target"), "k": report.get("k"),
                      "n_eval": report.get("n_eval")}
    elif ctx.quick:
        res.status, res.reason = "skipped", ("--quick: the audit is not run (a ci audit takes "
                                             "minutes); pass --audit-report PATH to read one")
        res.add("total_s", None, "s", res.reason)
        return res
    elif ctx.scale == "paper":
        res.status, res.reason = "skipped", ("a paper-scale audit needs MS-COCO and hours; "
                                             "pass --audit-report PATH to read one")
        res.add("total_s", None, "s", res.reason)
        return res
    else:
        from t2i_mia.pipeline.audit import run_audit
        from t2i_mia.pipeline.paths import RunPaths
        cfg = get_config("ci")
        with tempfile.TemporaryDirectory(prefix="t2i_mia_bench_audit_") as tmp:
            paths = RunPaths(work_dir=os.path.join(tmp, "work"), out=os.path.join(tmp, "out"),
                             target_dir=None, data_dir=None)
            with contextlib.redirect_stdout(sys.stderr):  # keep stdout for our table
                report = run_audit(cfg, paths, progress=False)
        timings = report["timings_s"]
        res.config = {"source": "run here: ci preset audit in a temporary folder (cold cache)",
                      "preset": "ci", "target": report.get("target"), "k": report.get("k"),
                      "n_eval": report.get("n_eval"), "devices": len(jax.devices())}
    for phase, seconds in timings.items():
        name = "total_s" if phase == "total" else f"{phase}_s"
        res.add(name, seconds, "s")
    return res


RUNNERS: dict[str, Callable[[Ctx], Result]] = {
    "ldm_train": bench_ldm_train,
    "ddim": bench_ddim,
    "dallebart_decode": bench_dallebart_decode,
    "features": bench_features,
    "mlp_vs_sklearn": bench_mlp_vs_sklearn,
    "audit": bench_audit,
}


# ----------------------------------------------------------------------------- report

def machine_info() -> dict:
    cpu_model = None
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    info = {"platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(), "cpu_model": cpu_model,
            "cpu_count": os.cpu_count()}
    with contextlib.suppress(AttributeError):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        info["load_avg_1_5_15_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def environment() -> dict:
    devs = jax.devices()
    import jaxlib
    return {"backend": jax.default_backend(), "device_count": len(devs),
            "device_kind": devs[0].device_kind, "jax_version": jax.__version__,
            "jaxlib_version": jaxlib.__version__, "flax_version": flax.__version__,
            "t2i_mia_version": t2i_mia.__version__}


def fmt(v: float | None) -> str:
    if v is None:
        return "null"
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.4g}"


def table(results: dict[str, Result]) -> str:
    rows = [("benchmark", "figure", "value", "unit / reason")]
    for name, r in results.items():
        if r.status == "error":
            rows.append((name, "ERROR", "", r.reason or ""))
        for key, fig in r.figures.items():
            rows.append((name, key, fmt(fig["value"]),
                         fig["unit"] if fig["value"] is not None else f"({fig['reason']})"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
        if j == 0:
            lines.append("-" * (sum(widths) + 6 + 13))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="benchmarks: " + ", ".join(BENCHMARKS) + "\nsee bench/README.md")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (the ci preset), fewer repeats; the audit is skipped "
                        "unless --audit-report is given")
    p.add_argument("--only", default=None, metavar="NAME,...",
                   help="comma-separated benchmarks to run (default: all)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results here")
    p.add_argument("--audit-report", default=None, metavar="PATH",
                   help="a report.json whose timings_s the audit benchmark reports")
    p.add_argument("--scale", choices=SCALES, default=None,
                   help="model sizes: ci (default with --quick), tiny (default), paper "
                        "(paper-ldm / dalle-mini sizes; accelerators only)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the model benchmarks (default float32)")
    p.add_argument("--batch", type=int, default=None,
                   help="override the batch size (rows for mlp_vs_sklearn, queries for "
                        "features) of every selected benchmark")
    p.add_argument("--repeats", type=int, default=None,
                   help="steady-state calls per measurement (default 5; 3 with --quick)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of one measurement's steady calls (default 60 s; "
                        "10 s with --quick); at least one steady call is always made")
    args = p.parse_args(argv)
    if args.only:
        names = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in names if s not in BENCHMARKS]
        if bad or not names:
            p.error(f"--only: unknown benchmark(s) {bad} (choose from {', '.join(BENCHMARKS)})")
        args.only = names
    for name in ("batch", "repeats"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name} must be >= 1, got {v}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    scale = args.scale or ("ci" if args.quick else "tiny")
    ctx = Ctx(quick=args.quick, scale=scale, dtype=jnp.dtype(args.dtype), batch=args.batch,
              repeats=args.repeats or (3 if args.quick else 5),
              budget_s=args.budget_s or (10.0 if args.quick else 60.0),
              audit_report=args.audit_report)
    names = args.only or list(BENCHMARKS)
    env = environment()
    doc = {"schema_version": SCHEMA_VERSION,
           "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds"),
           "command": [os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None
                                                         else list(argv)),
           "options": {"quick": ctx.quick, "scale": scale, "dtype": ctx.dtype_name,
                       "batch_override": ctx.batch, "repeats": ctx.repeats,
                       "budget_s": ctx.budget_s, "benchmarks": names},
           "machine": machine_info(), **env,
           "timing": "first_call_s = compile + first run; steady_s = median of the steady "
                     "calls, each ended by jax.block_until_ready",
           "benchmarks": {}}
    print(f"# t2i-mia bench: backend {env['backend']} x{env['device_count']} "
          f"({env['device_kind']}), jax {env['jax_version']}, scale {scale}, "
          f"dtype {ctx.dtype_name}", flush=True)
    results: dict[str, Result] = {}
    for name in names:
        t0 = time.perf_counter()
        if scale == "paper" and env["backend"] == "cpu" and name != "audit":
            r = Result(name, status="skipped",
                       reason="--scale paper needs an accelerator (backend is cpu)")
            r.add("steady_s", None, "s", r.reason)
        else:
            print(f"# {name} ...", file=sys.stderr, flush=True)
            try:
                r = RUNNERS[name](ctx)
            except Exception as e:  # one benchmark's failure must not hide the others
                traceback.print_exc()
                r = Result(name, status="error", reason=f"{type(e).__name__}: {e}")
        r.config.setdefault("wall_s", round(time.perf_counter() - t0, 2))
        results[name] = r
        doc["benchmarks"][name] = r.to_json()
        print(table({name: r}), flush=True)
        print(flush=True)
        with contextlib.suppress(OSError):
            doc["machine"]["load_avg_1_5_15_end"] = [round(v, 2) for v in os.getloadavg()]
        if args.json:  # after every benchmark: a run cut short keeps what it measured
            write_results(args.json, doc)
    if len(names) > 1:
        print("# summary")
        print(table(results), flush=True)
    if args.json:
        print(f"# wrote {args.json}")
    return 1 if any(r.status == "error" for r in results.values()) else 0


def write_results(path: str, doc: dict) -> None:
    """Atomic JSON write; every number must be finite (non-finite -> null + reason)."""
    from t2i_mia.models.formats import write_json
    json.dumps(doc, allow_nan=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, doc)


if __name__ == "__main__":
    sys.exit(main())
