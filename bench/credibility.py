#!/usr/bin/env python
"""Does the LDM target draw what it is asked to? A colour-and-shape probe on its generations.

    python bench/credibility.py [--config ci] [--work-dir t2i_mia_work] [--k 4] [--out F.json]

An audit's intuition 3 (members' generations are more faithful to their captions) only means
something for a model that is faithful in general. This command measures that on the
embedded synthetic data, whose captions name each object's colour and shape:

1. **Probe.** A small CNN is trained to tell which (colour, shape) objects an image holds
   (48 classes, multi-label) on real synthetic images from a stream of its own
   (``SyntheticCaptions(seed=PROBE_SEED)``, never an audit's); its accuracy is read on
   held-out real images of that stream.
2. **Generations.** The audit's target LDM (loaded from ``--work-dir``, trained there if
   absent, exactly as ``python -m t2i_mia.attack`` does) draws k images for each non-member
   caption (``--captions members``: each member caption, intuition 3's other side).
   ``found`` is the fraction of the captions' named objects the probe finds in them (a
   named object is found when its class is among the probe's top n, n the number of
   distinct objects the caption names); ``colour`` and ``shape`` read the two attributes
   alone. The same figures against a different caption (a derangement) are the chance level.
3. **Diversity.** Mean pairwise RMS distance between the k generations of one caption, over
   that between generations of different captions (1.0: the noise matters as much as the
   caption; 0: the model ignores its noise).
4. **Autoencoder.** PSNR of the autoencoder's reconstructions of the split's images and
   the probe's ``found`` on them: what the decoder alone keeps of the objects.

Prints a table and writes the figures as JSON (``--out``, written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

# A seed no audit uses by default (audits draw their data from --seed, 0 unless set).
PROBE_SEED = 0x50B5_0001
N_CLASSES = 48  # 8 colours x 6 shapes


# ----------------------------------------------------------------------------- captions

def named_objects(caption: str) -> list[int]:
    """The distinct (colour, shape) classes ``colour * 6 + shape`` a synthetic caption names,
    in order. Raises ValueError for a caption that names none."""
    from t2i_mia.data.synthetic import OBJECT_COLOURS, SHAPES
    colours = {name: i for i, (name, _) in enumerate(OBJECT_COLOURS)}
    shapes = {name: i for i, name in enumerate(SHAPES)}
    words = caption.lower().split()
    out: list[int] = []
    for prev, word in zip(words, words[1:]):
        if word in shapes and prev in colours:
            c = colours[prev] * len(SHAPES) + shapes[word]
            if c not in out:
                out.append(c)
    if not out:
        raise ValueError(f"caption names no '<colour> <shape>' object: {caption!r}")
    return out


def targets_of(captions: Sequence[str]) -> np.ndarray:
    """f32[N, 48 + 8 + 6]: 1 for each (colour, shape) class a caption names, then for each
    colour, then each shape."""
    y = np.zeros((len(captions), N_CLASSES + 8 + 6), np.float32)
    for i, cap in enumerate(captions):
        for c in named_objects(cap):
            y[i, [c, N_CLASSES + c // 6, N_CLASSES + 8 + c % 6]] = 1.0
    return y


# ----------------------------------------------------------------------------- the probe

def probe_module():
    import flax.linen as nn
    import jax.numpy as jnp

    class Probe(nn.Module):
        """Images f32[B, S, S, 3] in [0, 1] -> logits f32[B, 48 + 8 + 6]: the (colour, shape)
        classes, then colours and shapes alone (auxiliary targets that teach the two
        attributes from 8x and 6x more examples per class than their pairs)."""

        @nn.compact
        def __call__(self, x):
            b, s = x.shape[0], x.shape[1]
            # 2x2 space-to-depth: a quarter of the positions, the pixels kept in channels
            x = (x - 0.5).reshape(b, s // 2, 2, s // 2, 2, 3).transpose(0, 1, 3, 2, 4, 5)
            x = x.reshape(b, s // 2, s // 2, 12)
            x = nn.relu(nn.Conv(32, (3, 3))(x))
            x = nn.relu(nn.Conv(32, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
            x = nn.relu(nn.Conv(64, (3, 3))(x))
            x = nn.relu(nn.Conv(64, (3, 3))(x))
            # pooled over positions (a ~26-pixel window each): an object's features count
            # wherever it lies, so every object trains one shared detector
            x = jnp.concatenate([x.max(axis=(1, 2)), x.mean(axis=(1, 2))], axis=-1)
            x = nn.relu(nn.Dense(256)(x))
            return nn.Dense(N_CLASSES + 8 + 6)(x)

    return Probe()


def train_probe(image_size: int, n_train: int, steps: int, batch_size: int = 64,
                seed: int = 0, progress: bool = True, callback=None, every: int = 0,
                file: str | None = None, transform=None, transform_id: str = "real"):
    """Trains the probe on ``n_train`` images of the probe's own stream (ids 0..n_train-1).
    Returns (params, predict) with ``predict(params, uint8[B,S,S,3]) -> f32[B,48]``
    probabilities. ``transform`` (uint8[N,S,S,3] -> uint8[N,S,S,3], e.g. the autoencoder's
    reconstruction) is applied to the training images once; ``transform_id`` names it in the
    recipe. ``callback(step, params, predict)`` runs every ``every`` steps when given
    (learning curves). ``file``: the trained parameters are kept there (flax msgpack) and
    reused when its recipe (size, images, steps, batch, seed, transform) matches."""
    import jax
    import jax.numpy as jnp
    import optax

    from t2i_mia.data.synthetic import SyntheticCaptions

    data = SyntheticCaptions(PROBE_SEED, size=image_size, n=n_train)
    images, captions = data.get_many(range(n_train))
    if transform is not None:
        images = np.asarray(transform(images))
    y = targets_of(captions)
    model = probe_module()
    params = model.init(jax.random.PRNGKey(seed),
                        jnp.zeros((1, image_size, image_size, 3)))["params"]
    sched = optax.cosine_onecycle_schedule(steps, 2e-3, pct_start=0.1)
    tx = optax.adamw(sched, weight_decay=1e-4)
    opt = tx.init(params)

    def loss_fn(p, x, t):
        logits = model.apply({"params": p}, x)
        return optax.sigmoid_binary_cross_entropy(logits, t).sum(-1).mean()

    @jax.jit
    def step(p, o, x, t, key):
        x = x.astype(jnp.float32) / 255.0
        # flips keep every shape's class (all six are mirror-symmetric up to the rotation
        # jitter the data already has); they double the distinct training images
        flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
        x = jnp.where(flip, x[:, :, ::-1], x)
        loss, g = jax.value_and_grad(loss_fn)(p, x, t)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    @jax.jit
    def apply(p, x):
        logits = model.apply({"params": p}, x.astype(jnp.float32) / 255.0)
        return jax.nn.sigmoid(logits[:, :N_CLASSES])

    def predict(p, x: np.ndarray, batch: int = 512) -> np.ndarray:
        x = np.asarray(x)
        return np.concatenate([np.asarray(apply(p, x[i:i + batch]))
                               for i in range(0, len(x), batch)] or
                              [np.zeros((0, N_CLASSES), np.float32)])

    recipe = json.dumps({"image_size": image_size, "n_train": n_train, "steps": steps,
                         "batch_size": batch_size, "seed": seed, "probe_seed": PROBE_SEED,
                         "trained_on": transform_id},
                        sort_keys=True)
    if file and os.path.isfile(file) and os.path.isfile(file + ".json") \
            and open(file + ".json").read() == recipe:
        from flax import serialization
        with open(file, "rb") as f:
            return serialization.from_bytes(params, f.read()), predict
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed + 1)
    it = range(steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="probe", leave=False)
    for i in it:
        idx = rng.integers(0, n_train, batch_size)
        params, opt, loss = step(params, opt, images[idx], y[idx], jax.random.fold_in(key, i))
        if callback is not None and every and (i + 1) % every == 0:
            callback(i + 1, params, predict)

    if file:
        from flax import serialization
        _write_atomic(file, serialization.to_bytes(params))
        _write_atomic(file + ".json", recipe.encode())
    return params, predict


def found_rates(probs: np.ndarray, captions: Sequence[str]) -> dict:
    """Of each caption's named objects, the fraction the probe finds in its image.

    probs f32[N, 48]; captions N strings. ``found``: the class is among the probe's top n (n
    the number of distinct objects named); ``colour`` / ``shape``: the same for the attribute
    alone (an attribute's score is the max over the other's values)."""
    from t2i_mia.data.synthetic import SHAPES
    n_shapes = len(SHAPES)
    hit = {"found": [], "colour": [], "shape": []}
    p = probs.reshape(len(captions), -1, n_shapes)  # [N, colour, shape]
    for i, cap in enumerate(captions):
        named = named_objects(cap)
        n = len(named)
        top = set(np.argsort(-probs[i])[:n].tolist())
        hit["found"] += [c in top for c in named]
        # an attribute's score: the max over the other attribute's values
        for key, other, vals in (("colour", 1, {c // n_shapes for c in named}),
                                 ("shape", 0, {c % n_shapes for c in named})):
            score = p[i].max(axis=other)
            top_a = set(np.argsort(-score)[:len(vals)].tolist())
            hit[key] += [v in top_a for v in vals]
    return {k: float(np.mean(v)) for k, v in hit.items()}


# ----------------------------------------------------------------------------- figures

def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation of 0..n-1 with no fixed point (n >= 2)."""
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


def diversity(gen: np.ndarray, seed: int = 0) -> dict:
    """gen uint8[N, k, H, W, 3] (k >= 2). RMS distances on [0, 1] pixels: ``within`` (mean
    over captions of the mean pairwise distance of their k images), ``between`` (image j of
    caption i against image j of another caption), and their ratio."""
    g = gen.astype(np.float32) / 255.0
    n, k = g.shape[:2]
    flat = g.reshape(n, k, -1)
    within = []
    for a in range(k):
        for b in range(a + 1, k):
            within.append(np.sqrt(((flat[:, a] - flat[:, b]) ** 2).mean(-1)))
    within = float(np.mean(within))
    perm = derangement(n, seed)
    between = float(np.sqrt(((flat - flat[perm]) ** 2).mean(-1)).mean())
    return {"within_rms": within, "between_rms": between, "ratio": within / between}


def _write_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_json_atomic(path: str, doc: dict) -> None:
    _write_atomic(path, json.dumps(doc, indent=2).encode())


# ----------------------------------------------------------------------------- command

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Measured on 2 CPU cores at --config ci with the "
                                       "models cached: see bench/README.md.")
    p.add_argument("--config", default="ci", help="preset or JSON config (default ci)")
    p.add_argument("--work-dir", default="t2i_mia_work", help="the audit's model cache")
    p.add_argument("--k", type=int, default=4, help="images per caption (default 4)")
    p.add_argument("--n", type=int, default=None,
                   help="captions to draw (default: all of the chosen split)")
    p.add_argument("--captions", choices=("nonmembers", "members"), default="nonmembers",
                   help="the target's split whose captions are drawn: target_nonmembers "
                        "(default: does it draw unseen captions?) or target_members (are "
                        "its members' generations more faithful?)")
    p.add_argument("--probe-train", type=int, default=8000,
                   help="real images the probe trains on (default 8000)")
    p.add_argument("--probe-steps", type=int, default=4000,
                   help="probe training steps of 64 images (default 4000)")
    p.add_argument("--probe-test", type=int, default=1000,
                   help="held-out real images its accuracy is read on (default 1000)")
    p.add_argument("--probe-on", choices=("real", "autoencoder"), default="real",
                   help="what the probe trains on: real images (default), or their "
                        "reconstructions through the target's autoencoder, the domain every "
                        "generation is decoded into (held-out accuracy is then read on "
                        "reconstructions too)")
    p.add_argument("--probe-file", default=None, metavar="PATH",
                   help="keep the trained probe here and reuse it when its recipe matches")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.k < 2:
        p.error("--k must be >= 2 (diversity compares a caption's generations)")

    import hashlib

    import jax

    from t2i_mia.config import load_config
    from t2i_mia.data.sources import open_dataset
    from t2i_mia.data.splits import build_splits
    from t2i_mia.data.synthetic import SyntheticCaptions
    from t2i_mia.parallel.mesh import make_mesh
    from t2i_mia.targets import factory
    from t2i_mia.targets import public
    from t2i_mia.targets.ldm import LDMTarget

    cfg = load_config(args.config, args.overrides)
    if cfg.target != "ldm" or cfg.data.source != "synthetic":
        print("error: this check is for --target ldm on the embedded synthetic data",
              file=sys.stderr)
        return 2
    size = cfg.data.image_size
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    cache = factory.ModelCache(args.work_dir)
    dataset = open_dataset(cfg, sum(vars(cfg.data.splits).values()))
    m = build_splits(cfg, dataset)
    base = factory.ldm_base(cfg, dataset, m, cache, mesh)
    comps = factory.ldm_for(cfg, "target", dataset, m, base, cache, mesh)
    times["models_s"] = time.perf_counter() - t0

    def recon(x: np.ndarray) -> np.ndarray:
        return public.reconstruct(comps.vae_cfg, comps.vae_params, x, mesh)

    t0 = time.perf_counter()
    if args.probe_on == "autoencoder":
        # the probe file is reused only with the same autoencoder's reconstructions
        h = hashlib.sha256()
        for leaf in jax.tree_util.tree_leaves(comps.vae_params):
            h.update(np.asarray(leaf).tobytes())
        transform, transform_id = recon, "autoencoder:" + h.hexdigest()[:16]
    else:
        transform, transform_id = None, "real"
    params, predict = train_probe(size, args.probe_train, args.probe_steps, seed=0,
                                  file=args.probe_file, transform=transform,
                                  transform_id=transform_id)
    held = SyntheticCaptions(PROBE_SEED, size=size, n=args.probe_train + args.probe_test)
    h_img, h_cap = held.get_many(range(args.probe_train, args.probe_train + args.probe_test))
    probe_real = found_rates(predict(params, h_img), h_cap)
    probe_recon = found_rates(predict(params, recon(h_img)), h_cap)
    times["probe_s"] = time.perf_counter() - t0

    ids = m.ids(f"target_{args.captions}")[:args.n]
    images, captions = dataset.get_many(ids)
    t0 = time.perf_counter()
    model = LDMTarget(comps, cfg.ldm.sample, seed=cfg.seed, mesh=mesh, name="target")
    gen = np.asarray(model.generate(captions, ids, args.k))
    times["generate_s"] = time.perf_counter() - t0
    n, k = gen.shape[:2]

    t0 = time.perf_counter()
    g_probs = predict(params, gen.reshape((n * k,) + gen.shape[2:]))
    rep = [c for c in captions for _ in range(k)]
    perm = derangement(n, seed=1)
    wrong = [captions[perm[i]] for i in range(n) for _ in range(k)]
    recon_nm = recon(images)
    doc = {
        "config": cfg.preset, "seed": cfg.seed, "captions": args.captions,
        "n_captions": n, "k": k,
        "probe": {"train_images": args.probe_train, "steps": args.probe_steps,
                  "held_out_images": args.probe_test, "seed": PROBE_SEED,
                  "trained_on": args.probe_on,
                  "real_held_out": probe_real, "reconstructed_held_out": probe_recon,
                  f"real_{args.captions}": found_rates(predict(params, images), captions)},
        "generations": found_rates(g_probs, rep),
        "generations_wrong_caption": found_rates(g_probs, wrong),
        "diversity": diversity(gen),
        "autoencoder": {"psnr_db": public.psnr_db(recon_nm, images),
                        "found": found_rates(predict(params, recon_nm), captions)["found"]},
    }
    times["measure_s"] = time.perf_counter() - t0
    doc["times_s"] = {k_: round(v, 1) for k_, v in times.items()}

    pr, g, w = doc["probe"], doc["generations"], doc["generations_wrong_caption"]
    print(f"preset {cfg.preset}, seed {cfg.seed}: {n} {args.captions[:-1]} captions x k={k}; "
          f"probe trained on {args.probe_on} images")
    for name, key in (("real images", "real_held_out"),
                      ("reconstructions", "reconstructed_held_out")):
        r = pr[key]
        print(f"  probe on held-out {name:16s}found {r['found']:.3f}  "
              f"colour {r['colour']:.3f}  shape {r['shape']:.3f}")
    print(f"  probe on the split's images     found {pr['real_' + args.captions]['found']:.3f}")
    print(f"  generations                     found {g['found']:.3f}  colour {g['colour']:.3f}"
          f"  shape {g['shape']:.3f}")
    print(f"  ... against a wrong caption     found {w['found']:.3f}  colour {w['colour']:.3f}"
          f"  shape {w['shape']:.3f}  (chance)")
    d = doc["diversity"]
    print(f"  diversity: within {d['within_rms']:.4f} / between {d['between_rms']:.4f} "
          f"= {d['ratio']:.3f}")
    a = doc["autoencoder"]
    print(f"  autoencoder: PSNR {a['psnr_db']:.2f} dB, found on reconstructions "
          f"{a['found']:.3f}")
    print("  times: " + ", ".join(f"{k_} {v}" for k_, v in doc["times_s"].items()))
    if args.out:
        write_json_atomic(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
