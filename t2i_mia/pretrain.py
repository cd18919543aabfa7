"""``python -m t2i_mia.pretrain``: train a set of public components on the public pool.

Real text-to-image systems are built on public parts: an autoencoder, a caption tokenizer
and a base model that private fine-tunes start from; an auditor's image-text encoder is a
public model too. This command trains those parts for the embedded synthetic world on a
*public pool* (``public.pool`` scenes of the generator's own stream, never an audit's
seed) and writes a components folder (see :mod:`t2i_mia.targets.public`) that audits use
with ``--set public.components=FOLDER``:

* the LDM's caption tokenizer and autoencoder (``ldm.vae``, ``ldm.vae_train``);
* a base LDM (``ldm.unet``, ``ldm.text_encoder``, ``ldm.base_train``) when
  ``ldm.base_train.steps`` > 0; the audit's target, shadow and reference LDMs then
  fine-tune from it;
* the adversary's CLIP encoder (``adversary.encoder``), last: with
  ``adversary.encoder.hard_negatives = base`` its image-image term takes the base LDM's
  generation of each pool caption as that image's hard negative.

It measures, on ``public.heldout`` further pool images that none of them trained on, the
autoencoder's reconstruction PSNR and the encoder's caption-to-image retrieval R@1, and
records them, the recipe (preset, overrides, seed), every file's SHA-256 and the pool's
content hashes in components.json. Models are cached in --work-dir (a rerun resumes), and
the folder is written whole or not at all.

The set shipped in the package (``public.components=package``) was made by::

    python -m t2i_mia.pretrain --config tiny --set ldm.vae_train.steps=2400 \\
        --set ldm.base_train.steps=2500 --set ldm.base_train.batch_size=64 \\
        --set adversary.encoder.train.steps=8000 --out t2i_mia/assets/public
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time

import jax.numpy as jnp
import numpy as np

import t2i_mia
from t2i_mia import cli
from t2i_mia.adversary.encoder import train_or_load_encoder
from t2i_mia.config import PRESETS, Config, load_config
from t2i_mia.data.records import content_hash
from t2i_mia.errors import ConfigError
from t2i_mia.models import autoencoder_kl, formats
from t2i_mia.models.clip import save_clip
from t2i_mia.models.ldm import save_stable_diffusion
from t2i_mia.models.precision import policy_of
from t2i_mia.parallel.mesh import config_rules, make_mesh
from t2i_mia.targets import factory
from t2i_mia.targets import public as pub
from t2i_mia.timing import Timer

DESCRIPTION = __doc__.split("\n\n", 1)[1].strip()
EPILOG = """\
measured on 2 CPU cores (cold, compile included): the shipped recipe above about 28 min
(autoencoder 278 s, base LDM 726 s, the base's generations of the pool captions as the
encoder's hard negatives 176 s, encoder 517 s).
"""


def _encoder_recipe(cfg: Config) -> dict:
    """The encoder's config, without the image-term options it left at their defaults
    (a set made before they existed records the same recipe)."""
    enc = dataclasses.asdict(cfg.adversary.encoder)
    if enc["augmentation"] == "mild":
        del enc["augmentation"]
    if enc["hard_negatives"] == "none":
        del enc["hard_negatives"], enc["hard_negative_weight"]
    return enc


def recipe(cfg: Config, overrides: list[str]) -> dict:
    """What the components were made from: enough to make them again."""
    ldm = dataclasses.asdict(cfg.ldm)
    keep = ("vae", "vae_train", "vae_kl_weight", "vocab_size", "max_text_length", "unet",
            "text_encoder", "scheduler", "caption_dropout", "timestep_power", "base_train")
    return {"command": "python -m t2i_mia.pretrain", "preset": cfg.preset,
            "overrides": list(overrides), "seed": cfg.seed, "image_size": cfg.data.image_size,
            "precision": dataclasses.asdict(cfg.precision),
            "ldm": {k: ldm[k] for k in keep},
            "encoder": _encoder_recipe(cfg),
            "pool": {"n": cfg.public.pool, "heldout": cfg.public.heldout}}


def retrieval_r_at_1(encoder, images: np.ndarray, captions: list[str]) -> dict:
    """Caption-to-image retrieval among ``images``: R@1 (own image ranked first) and the
    rate at which the first image's caption is the query's (captions repeat)."""
    ei = encoder.embed_images(images)
    et = encoder.embed_texts(captions)
    top = np.asarray(jnp.argmax(et @ ei.T, axis=1))
    own = float(np.mean(top == np.arange(len(images))))
    same = float(np.mean([captions[j] == captions[i] for i, j in enumerate(top)]))
    return {"r_at_1": own, "caption_match_at_1": same, "chance": 1.0 / len(images),
            "n": len(images)}


def reconstruction_r_at_1(encoder, images: np.ndarray, recons: np.ndarray) -> dict:
    """Reconstruction-to-image retrieval among uint8[N,H,W,3] ``images``: the rate at which
    the image closest (cosine of image embeddings) to an image's reconstruction is that
    image. Generations are decoded images: the semantic attack needs this high."""
    def unit(e):
        e = np.asarray(e, np.float64)
        return e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = unit(encoder.embed_images(recons)) @ unit(encoder.embed_images(images)).T
    return {"r_at_1": float(np.mean(np.argmax(sim, axis=1) == np.arange(len(images)))),
            "chance": 1.0 / len(images), "n": len(images)}


def base_negatives(cfg: Config, base, captions: list[str], pool_hash: str, vae_cfg,
                   cache: factory.ModelCache, mesh) -> np.ndarray:
    """The base LDM's generation of each pool caption (uint8[N,H,W,3]), the encoder's hard
    negatives: the base's own sampler settings, noise from the pretrain seed. Cached in
    ``cache`` under the base's key, so a resumed pretrain skips the generation (its content
    enters the encoder's key, so it is needed even when the encoder is cached)."""
    base_key = factory._ldm_key(cfg, vae_cfg, pool_hash, cfg.ldm.base_train, None)
    key = factory.cache_key("negatives", base_key, dataclasses.asdict(cfg.ldm.sample),
                            cfg.seed, len(captions))
    path = os.path.join(cache.model_dir("negatives", key), "negatives.npy")
    if cache.done("negatives", key):
        return np.load(path)
    negatives = pub.base_generations(base, captions, cfg.ldm.sample, cfg.seed, mesh)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npy"
    np.save(tmp, negatives)
    os.replace(tmp, path)
    cache.mark_done("negatives", key, {"base": base_key, "n": int(len(negatives))})
    return negatives


def pretrain(cfg: Config, work_dir: str, out: str, overrides: list[str] = ()) -> dict:
    """Trains (or reuses from ``work_dir``) the public components of ``cfg`` and writes them
    to ``out`` (atomically: a temporary folder renamed at the end). Returns components.json."""
    if cfg.data.source != "synthetic":
        raise ConfigError("python -m t2i_mia.pretrain trains on the synthetic public pool "
                          "(data.source=synthetic); for real data use a public checkpoint "
                          "(--target-dir, adversary.encoder.dir)")
    ec = cfg.adversary.encoder
    if ec.hard_negatives == "base" and cfg.ldm.base_train.steps == 0:
        raise ConfigError("adversary.encoder.hard_negatives = 'base' needs the base LDM "
                          "(ldm.base_train.steps > 0)")
    timer = Timer()
    t0 = time.perf_counter()
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    cache = factory.ModelCache(work_dir)
    rules, policy = config_rules(cfg), policy_of(cfg)
    n, held = cfg.public.pool, cfg.public.heldout
    with timer.phase("pool"):
        pool = pub.public_pool(cfg.data.image_size, n + held)
        images, captions = pool.get_many(list(range(n)))
        held_images, held_captions = pool.get_many(list(range(n, n + held)))
        hashes = [content_hash(im) for im in images]
        all_hashes = hashes + [content_hash(im) for im in held_images]
        h = pub.pool_digest(hashes)
    with timer.phase("tokenizer"):
        tok = factory.train_or_load_tokenizer(cfg, captions, h, cache)
    with timer.phase("autoencoder"):
        vae = factory.train_or_load_autoencoder(cfg, images, h, cache, mesh)
    base = None
    if cfg.ldm.base_train.steps > 0:
        with timer.phase("base_ldm"):
            base = factory.train_or_load_ldm(cfg, "base", images, captions, h, vae, tok, cache,
                                             mesh, train_cfg=cfg.ldm.base_train)
    negatives = None
    if ec.hard_negatives == "base":
        with timer.phase("hard_negatives"):
            negatives = base_negatives(cfg, base, captions, h, vae[0], cache, mesh)
    with timer.phase("encoder"):
        # "autoencoder" views: the pool's reconstructions through the autoencoder just made
        views = (pub.reconstruct(vae[0], vae[1], images, mesh)
                 if ec.ssl_views == "autoencoder" else None)
        encoder = train_or_load_encoder(ec, images, captions, h, cfg.seed, cache, mesh, rules,
                                        policy, views=views, negatives=negatives)
    with timer.phase("measure"):
        held_recons = pub.reconstruct(vae[0], vae[1], held_images, mesh)
        measured = {
            "autoencoder_psnr_db": pub.psnr_db(held_recons, held_images),
            "encoder_retrieval": retrieval_r_at_1(encoder, held_images, held_captions),
            "encoder_reconstruction_retrieval": reconstruction_r_at_1(encoder, held_images,
                                                                      held_recons)}

    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    autoencoder_kl.save_vae(os.path.join(tmp, "vae"), *vae)
    tok.save(os.path.join(tmp, "tokenizer"))
    save_clip(os.path.join(tmp, "encoder"), encoder.cfg, encoder.params)
    encoder.tokenizer.save(os.path.join(tmp, "encoder"))
    if base is not None:
        save_stable_diffusion(os.path.join(tmp, "base"), base)
    pub.write_pool_hashes(os.path.join(tmp, pub.POOL_HASHES), all_hashes)
    files = pub.folder_files(tmp)
    timer.timings["total"] = time.perf_counter() - t0
    manifest = {
        "schema_version": pub.SCHEMA_VERSION,
        "name": f"synthetic{cfg.data.image_size}-{cfg.preset}",
        "tool": {"name": "t2i-mia", "version": t2i_mia.__version__},
        "contents": {"vae": True, "tokenizer": True, "encoder": True, "base": base is not None},
        "recipe": recipe(cfg, list(overrides)),
        "pool": {"dataset": pool.name, "seed": pub.POOL_SEED, "n": n, "heldout": held,
                 "image_size": cfg.data.image_size, "sha256": h,
                 "hashes_file": pub.POOL_HASHES},
        "measured_on_heldout": measured,
        "timings_s": {k: round(v, 1) for k, v in timer.timings.items()},
        "files": files,
        "sha256": pub.files_digest(files),
    }
    formats.write_json(os.path.join(tmp, pub.MANIFEST), manifest)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return manifest


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m t2i_mia.pretrain", description=DESCRIPTION,
                                epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", metavar="PRESET|FILE",
                   help=f"preset ({', '.join(PRESETS)}) or JSON file whose model sections "
                        "(ldm.vae, ldm.unet, adversary.encoder ...) the components take "
                        "(default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override one config value (repeatable)")
    p.add_argument("--seed", type=int, default=None,
                   help="training seed of the components (default: the config's, 0); the "
                        "pool does not depend on it")
    p.add_argument("--work-dir", default="t2i_mia_work", metavar="PATH",
                   help="model cache (a rerun resumes or reuses); default ./t2i_mia_work")
    p.add_argument("--out", default="t2i_mia_public", metavar="PATH",
                   help="the components folder to write (default ./t2i_mia_public)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled XLA programs in WORK_DIR/xla_cache")
    p.add_argument("--dry-run", action="store_true", help="print what would be trained and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.insert(0, f"seed={args.seed}")
    cfg = load_config(args.config, overrides)
    cfg.public.components = None  # what this command makes, not what it uses
    l, e = cfg.ldm, cfg.adversary.encoder
    lines = [f"t2i-mia pretrain: public components -> {os.path.abspath(args.out)}",
             f"  pool          {cfg.public.pool} synthetic scenes (own stream) + "
             f"{cfg.public.heldout} held out, {cfg.data.image_size}x{cfg.data.image_size}",
             f"  autoencoder   {l.vae_train.steps} steps x batch {l.vae_train.batch_size}",
             f"  encoder       {e.train.steps} steps x batch {e.train.batch_size}",
             "  base ldm      " + (f"{l.base_train.steps} steps x batch "
                                    f"{l.base_train.batch_size}" if l.base_train.steps
                                    else "none (ldm.base_train.steps=0)"),
             f"  seed          {cfg.seed}   work dir {os.path.abspath(args.work_dir)}"]
    print("\n".join(lines))
    if args.dry_run:
        return 0
    cli.use_compile_cache(os.path.abspath(args.work_dir), not args.no_compile_cache)
    m = pretrain(cfg, os.path.abspath(args.work_dir), os.path.abspath(args.out), overrides)
    r = m["measured_on_heldout"]
    print(f"wrote {args.out} ({m['sha256'][:16]}): autoencoder PSNR "
          f"{r['autoencoder_psnr_db']:.2f} dB, encoder R@1 {r['encoder_retrieval']['r_at_1']:.3f}"
          f" (chance {r['encoder_retrieval']['chance']:.4f}); {m['timings_s']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
