#!/usr/bin/env python
"""Memorisation and faithfulness of the LDM target: fine-tuned from a public base vs trained
from scratch, against training steps.

    python bench/fine_tune.py [--config ci] [--work-dir W] [--steps 125,250,500]
                              [--base-steps 2500] [--pretrain 4000] [--out F.json]

For each training length in ``--steps`` and each start (``scratch``: random initialisation;
``base``: the public base LDM, trained for ``--base-steps`` on a ``pretrain`` split of
``--pretrain`` images, ``ldm.base_train``), the target LDM is trained on the audit's members
exactly as ``python -m t2i_mia.attack`` does (cached in ``--work-dir``) and measured on
target_members against target_nonmembers:

- ``pixel_auc``: AUC of -MSE between each query image and the best of its k generations
  (the pixel attack's strongest single feature, no classifier);
- ``white_box_auc``: AUC of -denoising loss (outside the black-box threat model: the
  memorisation an attack could at best reach);
- ``found``: the colour-and-shape probe's rate of finding the named objects in the
  generations of non-member captions (bench/credibility.py), the model's faithfulness.

The base model's own ``found`` (it saw none of these captions) is the start of the
fine-tuned curve. Prints a table and writes JSON (``--out``, atomically).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="ci", help="preset or JSON config (default ci)")
    p.add_argument("--work-dir", default="t2i_mia_work", help="model cache")
    p.add_argument("--steps", default="125,250,500",
                   help="target training lengths, comma-separated (default 125,250,500)")
    p.add_argument("--base-steps", type=int, default=2500,
                   help="the base LDM's training steps (default 2500)")
    p.add_argument("--pretrain", type=int, default=4000,
                   help="images of the public pretrain split (default 4000)")
    p.add_argument("--k", type=int, default=2, help="images per caption (default 2)")
    p.add_argument("--probe-train", type=int, default=8000)
    p.add_argument("--probe-steps", type=int, default=4000, help="0: no probe (found: null)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE")
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]

    import credibility as cred  # bench/credibility.py, beside this file
    from t2i_mia.adversary import metrics as M
    from t2i_mia.config import load_config
    from t2i_mia.data.sources import open_dataset
    from t2i_mia.data.splits import build_splits
    from t2i_mia.parallel.mesh import make_mesh
    from t2i_mia.targets import factory
    from t2i_mia.targets.ldm import LDMTarget

    t0 = time.perf_counter()
    probe = None
    if args.probe_steps > 0:
        probe, predict = cred.train_probe(32, args.probe_train, args.probe_steps, seed=0)
    probe_s = time.perf_counter() - t0

    def config(start: str, n_steps: int):
        # its own base on its own pretrain split, not the shipped public components
        return load_config(args.config, list(args.overrides) + [
            "public.components=null",
            f"data.splits.pretrain={args.pretrain}", f"ldm.train.steps={n_steps}",
            f"ldm.base_train.steps={args.base_steps if start == 'base' else 0}"])

    cfg0 = config("base", steps[0])
    if cfg0.target != "ldm" or cfg0.data.source != "synthetic":
        print("error: this check is for --target ldm on the embedded synthetic data",
              file=sys.stderr)
        return 2
    mesh = make_mesh(cfg0.mesh.data, cfg0.mesh.model)
    cache = factory.ModelCache(args.work_dir)
    dataset = open_dataset(cfg0, sum(vars(cfg0.data.splits).values()))
    m = build_splits(cfg0, dataset)
    base = factory.ldm_base(cfg0, dataset, m, cache, mesh)
    mem, non = m.ids("target_members"), m.ids("target_nonmembers")
    mem_img, mem_cap = dataset.get_many(mem)
    non_img, non_cap = dataset.get_many(non)
    y = np.r_[np.ones(len(mem)), np.zeros(len(non))].astype(int)

    def measure(comps, seed: int) -> dict:
        model = LDMTarget(comps, cfg0.ldm.sample, seed=seed, mesh=mesh, name="target")
        g_mem = np.asarray(model.generate(mem_cap, mem, args.k, progress=False))
        g_non = np.asarray(model.generate(non_cap, non, args.k, progress=False))

        def mse(gen, img):
            d = (gen.astype(np.float32) - img[:, None].astype(np.float32)) / 255.0
            return (d * d).mean(axis=(2, 3, 4)).min(axis=1)

        wb = np.r_[model.white_box_loss(mem_img, mem_cap, mem),
                   model.white_box_loss(non_img, non_cap, non)]
        flat = g_non.reshape((-1,) + g_non.shape[2:])
        rep = [c for c in non_cap for _ in range(args.k)]
        return {"pixel_auc": M.roc_auc(-np.r_[mse(g_mem, mem_img), mse(g_non, non_img)], y),
                "white_box_auc": M.roc_auc(-wb, y),
                "found": (cred.found_rates(predict(probe, flat), rep)["found"]
                          if probe is not None else None),
                "diversity": cred.diversity(g_non)["ratio"]}

    rows, times = [], {"probe_s": round(probe_s, 1)}
    t0 = time.perf_counter()
    pre = factory.ldm_pretrained(cfg0, dataset, m, base, cache, mesh)
    times["base_s"] = round(time.perf_counter() - t0, 1)
    base_row = {"start": "base", "steps": 0, **measure(pre[1], cfg0.seed)}
    rows.append(base_row)
    for start in ("scratch", "base"):
        for n in steps:
            cfg = config(start, n)
            t0 = time.perf_counter()
            comps = factory.ldm_for(cfg, "target", dataset, m, base, cache, mesh)
            times[f"{start}_{n}_s"] = round(time.perf_counter() - t0, 1)
            rows.append({"start": start, "steps": n, **measure(comps, cfg.seed)})
            r = rows[-1]
            print(f"  {start:7s} {n:5d} steps  pixel AUC {r['pixel_auc']:.3f}  white-box AUC "
                  f"{r['white_box_auc']:.3f}  found {_fmt(r['found'])}  diversity "
                  f"{r['diversity']:.3f}", flush=True)
    doc = {"config": cfg0.preset, "seed": cfg0.seed, "pretrain": args.pretrain,
           "base_steps": args.base_steps, "k": args.k, "n_members": len(mem),
           "n_nonmembers": len(non), "rows": rows, "times_s": times}
    print(f"preset {cfg0.preset}, seed {cfg0.seed}: {len(mem)} members vs {len(non)} "
          f"non-members, k={args.k}; base: {args.base_steps} steps on {args.pretrain} images")
    print(f"  {'start':7s} {'steps':>5s}  pixel AUC  white-box AUC  found  diversity")
    for r in rows:
        print(f"  {r['start']:7s} {r['steps']:5d}  {r['pixel_auc']:9.3f}  "
              f"{r['white_box_auc']:13.3f}  {_fmt(r['found']):>5s}  {r['diversity']:9.3f}")
    print("  times: " + ", ".join(f"{k} {v}" for k, v in times.items()))
    if args.out:
        cred.write_json_atomic(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
