#!/usr/bin/env python
"""Does the public autoencoder keep the objects? PSNR and a colour-and-shape probe on its
reconstructions of held-out public-pool images.

    python bench/autoencoder.py [--config tiny] [--set ldm.vae_train.steps=2400] [--out F.json]
    python bench/autoencoder.py --components package     # the shipped set's autoencoder

Every generation of an LDM is decoded by its autoencoder, so what the decoder loses no
generation can show. This command trains the autoencoder that ``python -m t2i_mia.pretrain``
would train for the config (the same recipe, pool and cache key: a later pretrain on the
same ``--work-dir`` reuses it), or loads the one of a components folder, and measures:

1. **PSNR** of its reconstructions of the pool's ``public.heldout`` held-out images.
2. **Objects kept.** The probe of ``bench/credibility.py`` (48 colour x shape classes, its
   own image stream), trained on the reconstructions of its training images, reads the
   reconstructions of held-out probe images: ``found`` is the fraction of the captions'
   named objects it finds, ``colour`` and ``shape`` the two attributes alone. On real
   images the same probe finds 95% (bench/README.md), so this is what the decoder keeps.

Prints one line and writes the figures as JSON (``--out``, written atomically).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import credibility  # noqa: E402  (bench/credibility.py: the probe)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Measured on 2 CPU cores (the autoencoders of the "
                                       "small presets, 2400 steps: about 280 s each, the "
                                       "probe about 100 s): see bench/README.md.")
    p.add_argument("--config", default="tiny", help="preset or JSON config (default tiny)")
    p.add_argument("--components", default=None, metavar="DIR|package",
                   help="measure this components folder's autoencoder instead of training "
                        "one")
    p.add_argument("--work-dir", default="t2i_mia_work",
                   help="model cache (the pretrain command's)")
    p.add_argument("--probe-train", type=int, default=8000,
                   help="probe training images (default 8000)")
    p.add_argument("--probe-steps", type=int, default=4000,
                   help="probe training steps of 64 images (default 4000)")
    p.add_argument("--probe-test", type=int, default=1000,
                   help="held-out probe images read through the autoencoder (default 1000)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE")
    args = p.parse_args(argv)

    from t2i_mia import cli
    from t2i_mia.config import load_config
    from t2i_mia.data.records import content_hash
    from t2i_mia.data.synthetic import SyntheticCaptions
    from t2i_mia.parallel.mesh import make_mesh
    from t2i_mia.targets import factory
    from t2i_mia.targets import public as pub

    cfg = load_config(args.config, args.overrides)
    work = os.path.abspath(args.work_dir)
    cli.use_compile_cache(work, True)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    comps = pub.load_components(args.components) if args.components else None
    if comps is not None:
        # the folder's own pool: its held-out images are the ones none of its parts saw
        meta = comps.manifest["pool"]
        size, n, held = meta["image_size"], meta["n"], meta["heldout"]
    else:
        size, n, held = cfg.data.image_size, cfg.public.pool, cfg.public.heldout
    pool = pub.public_pool(size, n + held)
    held_images, _ = pool.get_many(list(range(n, n + held)))

    t0 = time.perf_counter()
    if comps is not None:
        vae = comps.vae()
        source = {"components": comps.folder, "sha256": comps.digest}
    else:
        images, _ = pool.get_many(list(range(n)))
        digest = pub.pool_digest([content_hash(im) for im in images])
        vae = factory.train_or_load_autoencoder(cfg, images, digest, factory.ModelCache(work),
                                                mesh)
        source = {"config": cfg.preset, "overrides": list(args.overrides),
                  "vae": dict(cfg.ldm.vae), "vae_train": dict(vars(cfg.ldm.vae_train))}
    vae_s = time.perf_counter() - t0

    def recon(x: np.ndarray) -> np.ndarray:
        return pub.reconstruct(vae[0], vae[1], x, mesh)

    psnr = pub.psnr_db(recon(held_images), held_images)
    t0 = time.perf_counter()
    params, predict = credibility.train_probe(size, args.probe_train, args.probe_steps,
                                              seed=0, transform=recon,
                                              transform_id="autoencoder")
    test = SyntheticCaptions(credibility.PROBE_SEED, size=size,
                             n=args.probe_train + args.probe_test)
    t_img, t_cap = test.get_many(range(args.probe_train, args.probe_train + args.probe_test))
    kept = credibility.found_rates(predict(params, recon(t_img)), t_cap)
    probe_s = time.perf_counter() - t0

    side = size // 2 ** (len(vae[0].block_out_channels) - 1)  # one downsample per extra block
    doc = {"autoencoder": source, "latent_shape": [side, side, vae[0].latent_channels],
           "heldout_psnr_db": psnr, "n_heldout": held,
           "probe": {"train_images": args.probe_train, "steps": args.probe_steps,
                     "test_images": args.probe_test, "seed": credibility.PROBE_SEED,
                     "trained_on": "autoencoder"},
           "reconstructions": kept,
           "times_s": {"autoencoder_s": round(vae_s, 1), "probe_s": round(probe_s, 1)}}
    print(f"autoencoder {doc['latent_shape']} latents: PSNR {psnr:.2f} dB on {held} held-out "
          f"pool images; on reconstructions the probe finds {kept['found']:.3f} of the "
          f"objects (colour {kept['colour']:.3f}, shape {kept['shape']:.3f}); "
          f"autoencoder {vae_s:.0f} s, probe {probe_s:.0f} s")
    if args.out:
        credibility.write_json_atomic(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
