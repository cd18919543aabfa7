#!/usr/bin/env python
"""Does a longer-trained base LDM draw the named shapes? The credibility probe against base steps.

    python bench/base_curve.py [--components package] [--chunks 3] [--steps 2500] [--out F.json]

The target's generations can only carry what its base LDM draws. This command takes the base
of a public components folder (default: the shipped set) and trains it further on the same
public pool (``--chunks`` rounds of ``--steps`` steps x ``--batch``, each round fine-tuned
from the previous one, cached in ``--work-dir`` so an interrupted run resumes at the last
finished round). Before the first round and after each one it measures, with the probe of
``bench/credibility.py``:

* **held-out captions**: ``--n`` captions of the pool's held-out images, which no part of the
  set trained on, x ``--k`` generations each; ``found`` / ``colour`` / ``shape`` as in
  bench/credibility.py, read by a probe trained on real images (``real``) and by one trained
  on the reconstructions of its images through the set's autoencoder (``autoencoder``, the
  domain every generation is decoded into);
* **training captions**: the same for the first ``--n`` pool captions (fit, not recall);
* **diversity**: within-caption over between-caption RMS distance of the held-out
  generations;
* once, the **autoencoder's ceiling**: the reconstruction probe on reconstructions of
  held-out probe images (no generation can keep more of the objects than its decoder).

Prints one line per round and writes the figures as JSON (``--out``, written atomically).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import credibility  # noqa: E402  (bench/credibility.py: the probe and its figures)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Measured on 2 CPU cores with the shipped set: each "
                                       "round of 2500 steps x 64 about 780-900 s, each "
                                       "measurement about 45 s, the two probes about 90 s "
                                       "each (bench/README.md).")
    p.add_argument("--components", default="package", metavar="DIR|package",
                   help="the public components whose base is trained further (default: the "
                        "shipped set)")
    p.add_argument("--work-dir", default="t2i_mia_work", help="model and probe cache")
    p.add_argument("--chunks", type=int, default=3, help="training rounds (default 3)")
    p.add_argument("--steps", type=int, default=2500, help="steps per round (default 2500)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak learning rate of each round (default 1e-3, the base's own)")
    p.add_argument("--n", type=int, default=256, help="captions per set (default 256)")
    p.add_argument("--k", type=int, default=4, help="generations per caption (default 4)")
    p.add_argument("--probe-train", type=int, default=8000,
                   help="images the probes train on (default 8000)")
    p.add_argument("--probe-steps", type=int, default=4000,
                   help="probe training steps of 64 images (default 4000)")
    p.add_argument("--probe-test", type=int, default=1000,
                   help="held-out probe images for the autoencoder's ceiling (default 1000)")
    p.add_argument("--seed", type=int, default=1, help="generation noise seed (default 1)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.k < 2:
        p.error("--k must be >= 2 (diversity compares a caption's generations)")
    for name in ("chunks", "steps", "batch", "n", "probe_train", "probe_steps", "probe_test"):
        if getattr(args, name) < (0 if name == "chunks" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")

    import jax

    from t2i_mia import cli
    from t2i_mia.config import TrainConfig, load_config
    from t2i_mia.data.records import content_hash
    from t2i_mia.data.synthetic import SyntheticCaptions
    from t2i_mia.parallel.mesh import make_mesh
    from t2i_mia.targets import factory
    from t2i_mia.targets import public as pub
    from t2i_mia.targets.ldm import LDMTarget

    work = os.path.abspath(args.work_dir)
    cli.use_compile_cache(work, True)
    comps = pub.load_components(args.components)
    recipe = comps.manifest.get("recipe", {})
    # the components' own preset and overrides: the shapes and sampler of their base
    cfg = load_config(recipe.get("preset", "tiny"), list(recipe.get("overrides", [])))
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    cache = factory.ModelCache(work)
    meta = comps.manifest["pool"]
    size, n_pool, n_held = meta["image_size"], meta["n"], meta["heldout"]
    if args.n > n_held:
        p.error(f"--n {args.n} exceeds the set's {n_held} held-out pool images")
    pool = pub.public_pool(size, n_pool + n_held)
    images, captions = pool.get_many(list(range(n_pool)))
    pool_digest = pub.pool_digest([content_hash(im) for im in images])
    held_caps = pool.get_many(list(range(n_pool, n_pool + args.n)))[1]
    train_caps = captions[:args.n]
    vae, tok = comps.vae(), comps.tokenizer()

    def recon(x: np.ndarray) -> np.ndarray:
        return pub.reconstruct(vae[0], vae[1], x, mesh)

    t0 = time.perf_counter()
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(vae[1]):
        h.update(np.asarray(leaf).tobytes())
    probes = {
        "real": credibility.train_probe(size, args.probe_train, args.probe_steps,
                                        file=os.path.join(work, "probes", "real.msgpack")),
        "autoencoder": credibility.train_probe(
            size, args.probe_train, args.probe_steps, transform=recon,
            transform_id="autoencoder:" + h.hexdigest()[:16],
            file=os.path.join(work, "probes", f"autoencoder-{h.hexdigest()[:16]}.msgpack")),
    }
    test = SyntheticCaptions(credibility.PROBE_SEED, size=size,
                             n=args.probe_train + args.probe_test)
    t_img, t_cap = test.get_many(range(args.probe_train, args.probe_train + args.probe_test))
    ae_params, ae_predict = probes["autoencoder"]
    ceiling = credibility.found_rates(ae_predict(ae_params, recon(t_img)), t_cap)
    probe_s = time.perf_counter() - t0

    def measure(model, steps_total: int, train_s: float) -> dict:
        t = time.perf_counter()
        row = {"base_steps": steps_total, "train_s": round(train_s, 1)}
        # one sampler for both caption sets: its compiled program is reused
        sampler = LDMTarget(model, cfg.ldm.sample, seed=args.seed, mesh=mesh, name="base-curve")
        for name, caps in (("heldout", held_caps), ("train", train_caps)):
            gen = np.asarray(sampler.generate(list(caps), list(range(len(caps))), args.k))
            flat = gen.reshape(-1, *gen.shape[2:])
            rep = [c for c in caps for _ in range(args.k)]
            row[name] = {probe: credibility.found_rates(pred(params, flat), rep)
                         for probe, (params, pred) in probes.items()}
            if name == "heldout":
                row["diversity"] = credibility.diversity(gen)["ratio"]
        row["measure_s"] = round(time.perf_counter() - t, 1)
        h_ = row["heldout"]["autoencoder"]
        print(f"base {steps_total:6d} steps: held-out found {h_['found']:.3f} colour "
              f"{h_['colour']:.3f} shape {h_['shape']:.3f} (reconstruction probe; real probe "
              f"{row['heldout']['real']['found']:.3f}), training captions "
              f"{row['train']['autoencoder']['found']:.3f}, diversity {row['diversity']:.3f}"
              f"  [{train_s:.0f} s training]", flush=True)
        return row

    base_recipe = recipe.get("ldm", {}).get("base_train", {})
    steps_total = int(base_recipe.get("steps", 0))
    init = comps.base_ldm()
    rows = [measure(init[1], steps_total, 0.0)]
    for c in range(args.chunks):
        tc = TrainConfig(steps=args.steps, batch_size=args.batch, learning_rate=args.lr,
                         warmup_steps=min(100, args.steps // 10), grad_clip=1.0,
                         checkpoint_every=500)
        members = f"public-pool-{pool_digest}"
        key = factory._ldm_key(cfg, vae[0], members, tc, init[0], comps.digest)
        t = time.perf_counter()
        model = factory.train_or_load_ldm(cfg, f"base-round{c + 1}", images, captions, members,
                                          vae, tok, cache, mesh, train_cfg=tc, init=init,
                                          public_digest=comps.digest)
        steps_total += args.steps
        rows.append(measure(model, steps_total, time.perf_counter() - t))
        init = (key, model)

    doc = {"components": {"folder": comps.folder, "sha256": comps.digest},
           "rounds": {"chunks": args.chunks, "steps": args.steps, "batch": args.batch,
                      "learning_rate": args.lr},
           "captions": {"n": args.n, "k": args.k, "seed": args.seed},
           "probe": {"train_images": args.probe_train, "steps": args.probe_steps,
                     "seed": credibility.PROBE_SEED, "probe_s": round(probe_s, 1)},
           "autoencoder_ceiling": ceiling, "rows": rows}
    print(f"autoencoder ceiling (reconstruction probe on reconstructions): found "
          f"{ceiling['found']:.3f} colour {ceiling['colour']:.3f} shape {ceiling['shape']:.3f}")
    if args.out:
        credibility.write_json_atomic(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
