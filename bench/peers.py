#!/usr/bin/env python
"""t2i-mia against its peers: the same work done by our code and by the code a user would
pick instead, in one run, interleaved, on the same configuration, batch, dtype and device.

    bash bench/peer-venv.sh                      # once: a throwaway venv with the peers
    /tmp/t2i-mia-peers/bin/python bench/peers.py [--quick] [--only NAME,...] [--json FILE]
                                                 [--sizes preset,large] [--dtype float32|bfloat16]
                                                 [--repeats R] [--budget-s S]

Benchmarks (``--only`` names), each at the ``ci``/default presets' size ("preset") and at
one larger size ("large"):

* ``ddim``: guided DDIM sampling, text ids -> uint8/[0, 1] images. Ours: text encoding, the
  one-jit ``schedulers.ddim_sample`` loop and the VAE decode in one ``jax.jit`` (as
  ``LDMTarget`` samples). Theirs: diffusers 0.39's ``FlaxStableDiffusionPipeline._generate``
  (its ``fori_loop`` over ``FlaxDDIMScheduler.step``, classifier-free guidance batched),
  jitted as the pipeline's ``jit=True`` path does, with transformers' ``FlaxCLIPTextModel``,
  diffusers' ``FlaxUNet2DConditionModel`` and ``FlaxAutoencoderKL``. Large: U-Net
  [128, 256] at 32x32 latents (128x128 images).
* ``ldm_train``: one LDM training step (U-Net + CLIP text encoder, ``ldm_loss``'s draws,
  the ``ldm.train`` optimiser, the project's ``make_train_step``/``jit_train_step`` with the
  state donated). Theirs: the same step with diffusers' ``FlaxUNet2DConditionModel`` in
  place of our U-Net (NCHW latents, as diffusers' Flax training script feeds it). Large:
  U-Net [128, 256] at 32x32 latents.
* ``dallebart_decode``: super-conditioned DalleBart decoding (condition scale 3, top-k 1,
  so both sides must draw the same tokens). Ours: ``dallebart.generate`` (KV cache, one
  jit). Theirs: dalle-mini 0.1.5's ``DalleBart.generate``, jitted as its inference
  notebook does. Large: d_model 512, 6+6 layers, 256 image tokens.

Both sides get the same parameters, written once by our savers in the peers' public
checkpoint formats and read back by the peers' own ``from_pretrained``; every benchmark
reports an output-agreement figure beside its ratio. Ratios are ours / theirs in speed
(their median time / ours): > 1 means ours is faster. Timing as ``bench/run.py``: a first
call (compile + run), then steady calls alternating A, B, A, B, ..., each ended by
``jax.block_until_ready``; the figure is the median.

The peers are never dependencies of t2i-mia or of its tests: without them this script
exits with status 3 and says how to build their venv.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
import traceback
import types
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BENCHMARKS = ("ddim", "ldm_train", "dallebart_decode")
SIZES = ("preset", "large")
PEERS_MISSING = 3  # exit status when the peers are not installed
PEER_VERSIONS = {"diffusers": "0.39.", "dalle_mini": "0.1.5"}
NEEDS = {"ddim": ("diffusers", "transformers"), "ldm_train": ("diffusers",),
         "dallebart_decode": ("dalle_mini", "transformers")}
VENV_HINT = ("the peers are never dependencies of t2i-mia; build their throwaway venv with "
             "`bash bench/peer-venv.sh` and run `/tmp/t2i-mia-peers/bin/python bench/peers.py`")


class PeersMissing(RuntimeError):
    pass


def _dalle_mini_compat() -> None:
    """The aliases dalle-mini 0.1.5 (written for jax 0.3.25) expects from old jax, and a
    stand-in for ``wandb``, which it imports only to fetch checkpoints from W&B."""
    import jax
    import jax.experimental
    import jax.numpy as jnp
    if not hasattr(jnp, "DeviceArray"):
        jnp.DeviceArray = jax.Array
    if not hasattr(jax.experimental, "PartitionSpec"):
        jax.experimental.PartitionSpec = jax.sharding.PartitionSpec
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))


def import_peers(names) -> dict[str, Any]:
    """{name: module} for the peers the selected benchmarks need; raises PeersMissing with
    what is missing or of the wrong version. diffusers is imported before the ``wandb``
    stand-in exists (diffusers probes for wandb and rejects a bare module)."""
    mods, problems = {}, []
    wanted = sorted(set(names), key=["diffusers", "transformers", "dalle_mini"].index)
    for name in wanted:
        try:
            if name == "dalle_mini":
                _dalle_mini_compat()
            mods[name] = __import__(name)
        except ImportError as e:
            problems.append(f"{name} ({e})")
            continue
        want = PEER_VERSIONS.get(name)
        have = getattr(mods[name], "__version__", "?")
        if want and not have.startswith(want):
            problems.append(f"{name} {have} (need {want.rstrip('.')}{'x' if want.endswith('.') else ''})")
    if problems:
        raise PeersMissing("bench/peers.py: peers missing: " + "; ".join(problems)
                           + ". " + VENV_HINT)
    return mods


# Heavy imports after the peer check, so a missing peer is reported at once.
def _heavy():
    global jax, jnp, np, run
    import jax  # noqa: F811
    import jax.numpy as jnp  # noqa: F811
    import numpy as np  # noqa: F811
    import run  # bench/run.py: Result, Ctx, measure_interleaved, random_params, ...


# ----------------------------------------------------------------------------- LDM sizes

def ldm_sizes(size: str) -> dict:
    """Configs of one LDM size: the ci/default presets' models (identical LDMs) or the
    larger U-Net [128, 256] at 32x32 latents."""
    from t2i_mia.config import get_config
    from t2i_mia.models import autoencoder_kl, schedulers, unet as unet_lib
    from t2i_mia.models.clip import CLIPTextConfig
    L = get_config("ci").ldm
    unet_d, vae_d = dict(L.unet), dict(L.vae)
    if size == "large":
        unet_d.update(block_out_channels=[128, 256], sample_size=32)
        f = autoencoder_kl.AutoencoderKLConfig.from_dict(vae_d).downsample_factor
        vae_d.update(sample_size=32 * f)
    return {"unet": unet_lib.UNet2DConditionConfig.from_dict(unet_d),
            "vae": autoencoder_kl.AutoencoderKLConfig.from_dict(vae_d),
            "text": CLIPTextConfig.from_dict(L.text_encoder),
            "sched": schedulers.SchedulerConfig.from_dict(L.scheduler),
            "steps": L.sample.num_inference_steps, "guidance": float(L.sample.guidance_scale),
            "length": L.max_text_length, "train": L.train,
            "caption_dropout": L.caption_dropout, "timestep_power": L.timestep_power,
            "unet_dict": unet_d, "vae_dict": vae_d, "text_dict": dict(L.text_encoder)}


def ldm_params(z: dict, seed: int) -> dict:
    from t2i_mia.models import autoencoder_kl, unet as unet_lib
    from t2i_mia.models.clip import CLIPTextModel
    text_shapes = jax.eval_shape(
        lambda k: CLIPTextModel(z["text"]).init(k, jnp.zeros((1, z["length"]), jnp.int32))
        ["params"], jax.random.PRNGKey(0))
    shapes = {"unet": unet_lib.param_shapes(z["unet"]), "text": text_shapes,
              "vae": autoencoder_kl.param_shapes(z["vae"])}
    return jax.device_get(run.random_params(shapes, seed))


def write_sd_folder(folder: str, z: dict, params: dict) -> None:
    """Our savers write the Stable Diffusion Flax layout the peers read."""
    from t2i_mia.models import autoencoder_kl, schedulers, unet as unet_lib
    from t2i_mia.models.clip import save_clip_text
    unet_lib.save_unet(os.path.join(folder, "unet"), z["unet"], params["unet"])
    autoencoder_kl.save_vae(os.path.join(folder, "vae"), z["vae"], params["vae"])
    save_clip_text(os.path.join(folder, "text_encoder"), z["text"], params["text"])
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    schedulers.save_scheduler_config(
        os.path.join(folder, "scheduler", "scheduler_config.json"), z["sched"])


def _policy(ctx) -> dict:
    return {"dtype": ctx.dtype, "param_dtype": jnp.float32}


# ----------------------------------------------------------------------------- ddim

def bench_ddim(ctx, sizes, peers) -> "run.Result":
    from diffusers import (FlaxAutoencoderKL, FlaxDDIMScheduler, FlaxStableDiffusionPipeline,
                           FlaxUNet2DConditionModel)
    from transformers import FlaxCLIPTextModel
    from t2i_mia.models import autoencoder_kl, schedulers, unet as unet_lib
    from t2i_mia.models.clip import CLIPTextModel
    from t2i_mia.targets.ldm import to_uint8

    res = run.Result("ddim", config={
        "ours": "text encoding + schedulers.ddim_sample (one fori_loop) + VAE decode, one jit",
        "theirs": "diffusers FlaxStableDiffusionPipeline._generate, jitted (jit=True path)",
        "eta": 0.0, "dtype": ctx.dtype_name, "mesh": "1 device",
        "prompts": "random ids, no attention mask (the pipeline's encoding), negative "
                   "prompt ids given", "sizes": {}})
    for size in sizes:
        z = ldm_sizes(size)
        bs = ctx.batch or (2 if size == "large" else 8)
        S, g, length = z["steps"], z["guidance"], z["length"]
        lat = z["vae"].sample_size // z["vae"].downsample_factor
        lat_shape = (lat, lat, z["unet"].in_channels)
        params = ldm_params(z, 0)
        res.config["sizes"][size] = {
            "batch_size": bs, "image_size": z["vae"].sample_size, "latent_shape": list(lat_shape),
            "num_inference_steps": S, "guidance_scale": g, "unet": z["unet_dict"],
            "vae": z["vae_dict"], "text_encoder": z["text_dict"],
            "prediction_type": z["sched"].prediction_type, "n_params": run.n_params(params)}
        policy = _policy(ctx)
        text = CLIPTextModel(z["text"], **policy)
        unet = unet_lib.UNet2DConditionModel(z["unet"], **policy)
        vae = autoencoder_kl.AutoencoderKL(z["vae"], **policy)
        timesteps = jnp.asarray(schedulers.ddim_timesteps(z["sched"], S))
        scale = z["vae"].scaling_factor

        def ours(p, ids, u_ids, x):
            ones = jnp.ones(ids.shape, jnp.int32)
            c = text.apply({"params": p["text"]}, ids, ones)[0]
            u = text.apply({"params": p["text"]}, u_ids, ones)[0]
            eps = lambda x, t, cc: unet.apply({"params": p["unet"]}, x, t, cc)  # noqa: E731
            z0 = schedulers.ddim_sample(eps, z["sched"], x, c, u, g, timesteps, 0.0, None)
            return to_uint8(vae.apply({"params": p["vae"]}, z0 / scale, method="decode"))

        with tempfile.TemporaryDirectory() as d:
            write_sd_folder(d, z, params)
            d_unet, p_unet = FlaxUNet2DConditionModel.from_pretrained(
                os.path.join(d, "unet"), dtype=ctx.dtype)
            d_vae, p_vae = FlaxAutoencoderKL.from_pretrained(os.path.join(d, "vae"),
                                                             dtype=ctx.dtype)
            d_text = FlaxCLIPTextModel.from_pretrained(os.path.join(d, "text_encoder"),
                                                       dtype=ctx.dtype)
            p_text = d_text.params
            d_sched, s_state = FlaxDDIMScheduler.from_pretrained(os.path.join(d, "scheduler"))
        pipe = FlaxStableDiffusionPipeline(
            vae=d_vae, text_encoder=d_text, tokenizer=None, unet=d_unet, scheduler=d_sched,
            safety_checker=None, feature_extractor=None, dtype=ctx.dtype)
        p_theirs = {"text_encoder": p_text, "unet": p_unet, "vae": p_vae, "scheduler": s_state}
        h = z["vae"].sample_size
        theirs = jax.jit(lambda p, ids, u_ids, x: pipe._generate(
            ids, p, jax.random.PRNGKey(0), S, h, h, g, jnp.transpose(x, (0, 3, 1, 2)), u_ids))

        rng = np.random.default_rng(1)
        ids = jnp.asarray(run.random_ids(rng, bs, length, z["text"].vocab_size))
        u_ids = jnp.asarray(run.random_ids(rng, 1, length, z["text"].vocab_size).repeat(bs, 0))
        x = jax.random.normal(jax.random.PRNGKey(2), (bs, *lat_shape), jnp.float32)
        p_ours = jax.device_put(params)
        ours_c, ours_compile = run.aot_compile(jax.jit(ours), p_ours, ids, u_ids, x)
        theirs_c, theirs_compile = run.aot_compile(theirs, p_theirs, ids, u_ids, x)
        out = {}

        def call_ours():
            out["ours"] = ours_c(p_ours, ids, u_ids, x)
            return out["ours"]

        def call_theirs():
            out["theirs"] = theirs_c(p_theirs, ids, u_ids, x)
            return out["theirs"]

        tm = run.measure_interleaved({"ours": call_ours, "theirs": call_theirs}, ctx,
                                     {"ours": ours_compile, "theirs": theirs_compile})
        a = np.asarray(out["ours"], np.float32)
        b = np.asarray(out["theirs"], np.float32) * 255.0  # [0, 1] float -> uint8 scale
        _pair(res, size, tm, bs, "images/s", "images_per_s")
        res.add(f"{size}_max_abs_diff_uint8", float(np.abs(a - np.round(b)).max()),
                "uint8 levels (ours vs round(255 * theirs))")
        res.add(f"{size}_images_std_uint8", float(a.std()), "uint8 levels (ours; not blank)")
    return res


def _pair(res, size: str, tm: dict, per_call: float, unit: str, per_call_name: str) -> None:
    res.add_timing(f"{size}_ours_", tm["ours"], per_call, unit, per_call_name)
    res.add_timing(f"{size}_theirs_", tm["theirs"], per_call, unit, per_call_name)
    res.add(f"{size}_ratio", tm["theirs"].steady_s / tm["ours"].steady_s,
            "x (ours / theirs in speed; > 1: ours faster)")


# ----------------------------------------------------------------------------- ldm_train

def bench_ldm_train(ctx, sizes, peers) -> "run.Result":
    from diffusers import FlaxUNet2DConditionModel
    from t2i_mia.models import schedulers
    from t2i_mia.models.clip import CLIPTextModel
    from t2i_mia.training.ldm_train import ldm_loss, make_optimizer, sample_timesteps
    from t2i_mia.training.loop import create_train_state, jit_train_step, make_train_step

    res = run.Result("ldm_train", config={
        "ours": "ldm_loss (our U-Net + CLIP text encoder), make_train_step + jit_train_step",
        "theirs": "the same loss, draws, optimiser and step machinery with diffusers' "
                  "FlaxUNet2DConditionModel (NCHW latents) as the U-Net",
        "dtype": ctx.dtype_name, "mesh": "1 device", "sizes": {}})
    mesh = run.single_device_mesh()
    for size in sizes:
        z = ldm_sizes(size)
        bs = ctx.batch or (8 if size == "large" else z["train"].batch_size)
        s, length = z["unet"].sample_size, z["length"]
        params = ldm_params(z, 0)
        params = {"unet": params["unet"], "text": params["text"]}
        res.config["sizes"][size] = {
            "batch_size": bs, "latent_shape": [s, s, z["unet"].in_channels],
            "text_length": length, "unet": z["unet_dict"], "text_encoder": z["text_dict"],
            "optimizer": "adamw (make_optimizer of ldm.train)",
            "caption_dropout": z["caption_dropout"], "timestep_power": z["timestep_power"],
            "n_params": run.n_params(params)}
        policy = _policy(ctx)
        tx = make_optimizer(z["train"])
        u_ids = jnp.zeros((length,), jnp.int32)
        u_mask = jnp.zeros((length,), jnp.int32).at[:2].set(1)
        unet_cfg, text_cfg, sched = z["unet"], z["text"], z["sched"]

        def loss_ours(p, batch, rng):
            return ldm_loss(unet_cfg, text_cfg, sched, p, batch, rng, uncond_ids=u_ids,
                            uncond_mask=u_mask, caption_dropout=z["caption_dropout"],
                            timestep_power=z["timestep_power"], policy=policy)

        with tempfile.TemporaryDirectory() as d:
            write_sd_folder(d, z, {**params, "vae": ldm_params(z, 0)["vae"]})
            d_unet, p_unet = FlaxUNet2DConditionModel.from_pretrained(
                os.path.join(d, "unet"), dtype=ctx.dtype)
        text_model = CLIPTextModel(text_cfg, **policy)
        ac = schedulers.alphas_cumprod(sched)

        def loss_theirs(p, batch, rng):  # ldm_loss's draws, in the same order
            lat = batch["latents"]  # NCHW
            kt, kn, kd = jax.random.split(rng, 3)
            b = lat.shape[0]
            t = sample_timesteps(kt, b, sched.num_train_timesteps, z["timestep_power"])
            noise = jnp.transpose(jax.random.normal(kn, (b, *lat.shape[2:], lat.shape[1])),
                                  (0, 3, 1, 2))  # the NHWC draw of ldm_loss, as NCHW
            drop = jax.random.bernoulli(kd, z["caption_dropout"], (b,))[:, None]
            cids = jnp.where(drop, u_ids[None], batch["ids"])
            cmask = jnp.where(drop, u_mask[None], batch["mask"])
            noisy = schedulers.add_noise(ac, lat, noise, t)
            c, _ = text_model.apply({"params": p["text"]}, cids, cmask)
            pred = d_unet.apply({"params": p["unet"]}, noisy, t, c).sample
            target = schedulers.training_target(sched, ac, lat, noise, t)
            per_ex = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))
            return jnp.mean(per_ex), {}

        rng = np.random.default_rng(0)
        lat = rng.standard_normal((bs, s, s, unet_cfg.in_channels), np.float32)
        batch = {"latents": lat, "ids": run.random_ids(rng, bs, length, text_cfg.vocab_size),
                 "mask": np.ones((bs, length), np.int32)}
        batch_t = {**batch, "latents": np.ascontiguousarray(lat.transpose(0, 3, 1, 2))}
        steps, states, batches, losses = {}, {}, {}, {}
        comp = {}
        for name, fn, bt, pu in (("ours", loss_ours, batch, params["unet"]),
                                 ("theirs", loss_theirs, batch_t, p_unet)):
            state = create_train_state({"unet": pu, "text": params["text"]}, tx, 1)
            step = jit_train_step(make_train_step(fn, tx), mesh, state, bt)
            states[name] = step.place(state)
            batches[name] = jax.device_put(bt, step.batch_shardings)
            steps[name], comp[name] = run.aot_compile(step.jitted, states[name], batches[name])

        def caller(name):
            def call():
                states[name], metrics = steps[name](states[name], batches[name])
                losses.setdefault(name, []).append(metrics["loss"])
                return states[name], metrics
            return call

        tm = run.measure_interleaved({k: caller(k) for k in ("ours", "theirs")}, ctx, comp)
        _pair(res, size, tm, bs, "examples/s", "examples_per_s")
        # Same state, batch and rng: the first steps' losses must agree.
        lo = np.asarray(jax.device_get(losses["ours"]), np.float64)
        lt = np.asarray(jax.device_get(losses["theirs"]), np.float64)
        n = min(len(lo), len(lt))
        res.add(f"{size}_loss_max_rel_diff", float(np.max(np.abs(lo[:n] - lt[:n])
                                                          / np.abs(lt[:n]))),
                f"relative (losses of the {n} steps each side ran)")
        res.add(f"{size}_first_loss", float(lo[0]), "loss")
    return res


# ----------------------------------------------------------------------------- dallebart

def dalle_sizes(size: str) -> list[tuple[str, dict]]:
    """(name, DalleBart config) per size: the ci and default presets' models, or the large
    one (d_model 512, 6+6 layers, 256 image tokens)."""
    from t2i_mia.config import get_config
    if size == "preset":
        return [(name, dict(get_config(name).dalle.bart)) for name in ("ci", "tiny")]
    return [("large", dict(d_model=512, encoder_layers=6, decoder_layers=6,
                           encoder_attention_heads=8, decoder_attention_heads=8,
                           encoder_ffn_dim=1365, decoder_ffn_dim=1365, encoder_vocab_size=4096,
                           image_vocab_size=4096, image_length=256, max_text_length=64,
                           dropout=0.0, gradient_checkpointing=False))]


def bench_dallebart_decode(ctx, sizes, peers) -> "run.Result":
    from dalle_mini.model import DalleBart as PeerDalleBart
    from t2i_mia.models import dallebart as db

    cond_scale = 3.0
    res = run.Result("dallebart_decode", config={
        "ours": "dallebart.generate (KV cache, one jit)",
        "theirs": "dalle-mini DalleBart.generate, jitted (as its inference notebook pmaps it)",
        "sampling": "super-conditioned, condition_scale 3, top_k 1 (deterministic: both "
                    "sides must draw the same tokens)", "condition_scale": cond_scale,
        "dtype": ctx.dtype_name, "mesh": "1 device", "sizes": {}})
    for size in sizes:
        for name, bart in dalle_sizes(size):
            cfg = db.DalleBartConfig.from_dict(bart)
            bs = ctx.batch or 4
            L = cfg.max_text_length
            shapes = jax.eval_shape(lambda k: db.init_dallebart(cfg, k), jax.random.PRNGKey(0))
            params = jax.device_get(run.random_params(shapes, 3))
            res.config["sizes"][name] = {**bart, "batch_size": bs,
                                         "n_params": run.n_params(params)}
            with tempfile.TemporaryDirectory() as d:
                db.save_dallebart(d, cfg, params)
                peer, p_theirs = PeerDalleBart.from_pretrained(d, _do_init=False,
                                                               dtype=ctx.dtype)
            rng = np.random.default_rng(4)
            ids = jnp.asarray(run.random_ids(rng, bs, L, cfg.encoder_vocab_size))
            mask = jnp.ones((bs, L), jnp.int32).at[1, L // 2:].set(0)  # row 1 padded
            u_ids = jnp.zeros((bs, L), jnp.int32)
            u_mask = jnp.zeros((bs, L), jnp.int32).at[:, :2].set(1)
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(5), i))(
                jnp.arange(bs))
            p_ours = jax.device_put(params)

            def theirs_fn(p, ids, mask, u_ids, u_mask):
                return peer.generate(ids, mask, prng_key=jax.random.PRNGKey(5), params=p,
                                     do_sample=True, top_k=1, condition_scale=cond_scale,
                                     input_ids_uncond=u_ids,
                                     attention_mask_uncond=u_mask).sequences

            theirs_c, theirs_compile = run.aot_compile(jax.jit(theirs_fn), p_theirs, ids,
                                                       mask, u_ids, u_mask)
            out = {}

            def call_ours():
                out["ours"] = db.generate(p_ours, cfg, ids, mask, keys, uncond_input_ids=u_ids,
                                          uncond_attention_mask=u_mask,
                                          condition_scale=cond_scale, top_k=1,
                                          dtype=ctx.dtype)
                return out["ours"]

            def call_theirs():
                out["theirs"] = theirs_c(p_theirs, ids, mask, u_ids, u_mask)
                return out["theirs"]

            tm = run.measure_interleaved({"ours": call_ours, "theirs": call_theirs}, ctx,
                                         {"theirs": theirs_compile})
            tokens = bs * cfg.image_length
            _pair(res, name, tm, tokens, "tokens/s", "tokens_per_s")
            a, b = np.asarray(out["ours"]), np.asarray(out["theirs"])
            agree = float(np.mean(a[:, 1:] == b[:, 1:b.shape[1]])) if a.shape == b.shape \
                else None
            res.add(f"{name}_token_agreement", agree, "fraction of image tokens equal",
                    None if agree is not None else f"shapes differ: {a.shape} vs {b.shape}")
    return res


RUNNERS = {"ddim": bench_ddim, "ldm_train": bench_ldm_train,
           "dallebart_decode": bench_dallebart_decode}


# ----------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/peers.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="benchmarks: " + ", ".join(BENCHMARKS) + "\nmeasured on 2 vCPUs (float32): "
               "--quick 48 s, both sizes 4 min 39 s; the peer venv builds in about 1 min "
               "(pip cache warm)\nsee bench/README.md, \"Peers\"")
    p.add_argument("--check", action="store_true",
                   help="only check that the peers import (with their aliases) and print "
                        "their versions")
    p.add_argument("--quick", action="store_true",
                   help="the preset size only, 3 repeats, 10 s budget per measurement")
    p.add_argument("--only", default=None, metavar="NAME,...",
                   help="comma-separated benchmarks (default: all)")
    p.add_argument("--sizes", default=None, metavar="SIZE,...",
                   help="preset and/or large (default: both; preset with --quick)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results here")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of both sides (parameters stay float32)")
    p.add_argument("--batch", type=int, default=None, help="override every batch size")
    p.add_argument("--repeats", type=int, default=None,
                   help="steady calls per side (default 7; 3 with --quick)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="budget of one measurement's steady calls, both sides together "
                        "(default 60 s; 10 s with --quick)")
    args = p.parse_args(argv)
    for opt, allowed in (("only", BENCHMARKS), ("sizes", SIZES)):
        v = getattr(args, opt)
        if v is None:
            continue
        names = [s.strip() for s in v.split(",") if s.strip()]
        bad = [s for s in names if s not in allowed]
        if bad or not names:
            p.error(f"--{opt}: unknown {bad} (choose from {', '.join(allowed)})")
        setattr(args, opt, names)
    for name in ("batch", "repeats"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name} must be >= 1, got {v}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    names = args.only or list(BENCHMARKS)
    try:
        peers = import_peers([m for n in names for m in NEEDS[n]])
    except PeersMissing as e:
        print(e, file=sys.stderr)
        return PEERS_MISSING
    if args.check:
        print("peers ok: " + ", ".join(f"{k} {getattr(m, '__version__', '?')}"
                                       for k, m in peers.items()))
        return 0
    _heavy()
    sizes = args.sizes or (["preset"] if args.quick else list(SIZES))
    ctx = run.Ctx(quick=args.quick, scale="ci", dtype=jnp.dtype(args.dtype), batch=args.batch,
                  repeats=args.repeats or (3 if args.quick else 7),
                  budget_s=args.budget_s or (10.0 if args.quick else 60.0), audit_report=None)
    env = run.environment()
    env["peer_versions"] = {k: getattr(m, "__version__", "?") for k, m in peers.items()}
    doc = {"schema_version": 1,
           "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds"),
           "command": ["bench/peers.py"] + (sys.argv[1:] if argv is None else list(argv)),
           "options": {"quick": args.quick, "sizes": sizes, "dtype": ctx.dtype_name,
                       "batch_override": ctx.batch, "repeats": ctx.repeats,
                       "budget_s": ctx.budget_s, "benchmarks": names},
           "machine": run.machine_info(), **env,
           "timing": "first_call_s = compile + first run; steady_s = median of the steady "
                     "calls, ours and theirs alternating, each ended by "
                     "jax.block_until_ready; ratio = theirs steady_s / ours steady_s",
           "benchmarks": {}}
    print(f"# t2i-mia vs peers: backend {env['backend']} ({env['device_kind']}), jax "
          f"{env['jax_version']}, {', '.join(f'{k} {v}' for k, v in env['peer_versions'].items())}"
          f", sizes {','.join(sizes)}, dtype {ctx.dtype_name}", flush=True)
    results = {}
    for name in names:
        t0 = time.perf_counter()
        print(f"# {name} ...", file=sys.stderr, flush=True)
        try:
            r = RUNNERS[name](ctx, sizes, peers)
        except Exception as e:  # one benchmark's failure must not hide the others
            traceback.print_exc()
            r = run.Result(name, status="error", reason=f"{type(e).__name__}: {e}")
        r.config["wall_s"] = round(time.perf_counter() - t0, 2)
        results[name] = r
        doc["benchmarks"][name] = r.to_json()
        print(run.table({name: r}), "\n", flush=True)
        if args.json:
            run.write_results(args.json, doc)
    ratios = [(n, k, f["value"]) for n, r in results.items() for k, f in r.figures.items()
              if k.endswith("_ratio") and f["value"] is not None]
    print("# ratios (ours / theirs in speed)")
    for n, k, v in ratios:
        print(f"  {n:17s} {k[:-len('_ratio')]:8s} {v:6.2f}x")
    if args.json:
        print(f"# wrote {args.json}")
    return 1 if any(r.status == "error" for r in results.values()) or not ratios else 0


if __name__ == "__main__":
    sys.exit(main())
