#!/usr/bin/env python
"""Does the LDM target memorise its members? Members against non-members, at any preset.

    python bench/memorisation.py [--config tiny] [--work-dir t2i_mia_work] [--k 4]

Loads (or trains, if not cached in ``--work-dir``) the audit's autoencoder, target and
shadow LDMs exactly as ``python -m t2i_mia.attack`` does, generates k images per caption
for target_members and target_nonmembers from both models, and compares the pixel MSE
between each query image and the best of its k generations. Prints, per model, the mean
MSE of members and non-members, the one-sided Mann-Whitney p-value (members lower) and the
AUC of -MSE. The shadow model never saw the target's members, so its p-value is the null.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset or JSON config (default tiny)")
    p.add_argument("--work-dir", default="t2i_mia_work", help="the audit's model cache")
    p.add_argument("--k", type=int, default=4, help="images per caption (default 4)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE")
    args = p.parse_args(argv)

    import numpy as np
    from scipy.stats import mannwhitneyu

    from t2i_mia.adversary import metrics as M
    from t2i_mia.data.sources import open_dataset as build_dataset
    from t2i_mia.data.splits import build_splits
    from t2i_mia.config import load_config
    from t2i_mia.parallel.mesh import make_mesh
    from t2i_mia.targets import factory
    from t2i_mia.targets.ldm import LDMTarget

    cfg = load_config(args.config, args.overrides)
    if cfg.target != "ldm":
        print("error: this check is for --target ldm", file=sys.stderr)
        return 2
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    cache = factory.ModelCache(args.work_dir)
    dataset = build_dataset(cfg, sum(vars(cfg.data.splits).values()))
    m = build_splits(cfg, dataset)
    base = factory.ldm_base(cfg, dataset, m, cache, mesh)
    mem, non = m.ids("target_members"), m.ids("target_nonmembers")
    y = np.r_[np.ones(len(mem)), np.zeros(len(non))].astype(int)
    print(f"preset {cfg.preset}: {len(mem)} members vs {len(non)} non-members, k={args.k}, "
          f"pixel MSE (min over k, [0,1] pixels)")
    for name in ("target", "shadow"):
        comps = factory.ldm_for(cfg, name, dataset, m, base, cache, mesh)
        model = LDMTarget(comps, cfg.ldm.sample, seed=cfg.seed, mesh=mesh, name=name)

        def mse(ids):
            images, captions = dataset.get_many(ids)
            gen = np.asarray(model.generate(captions, ids, args.k)).astype(np.float32)
            d = (gen - images[:, None].astype(np.float32)) / 255.0
            return (d * d).mean(axis=(2, 3, 4)).min(axis=1)

        a, b = mse(mem), mse(non)
        pval = mannwhitneyu(a, b, alternative="less").pvalue
        auc = M.roc_auc(-np.r_[a, b], y)
        print(f"  {name:7s} MSE members {a.mean():.4f}  non-members {b.mean():.4f}  "
              f"Mann-Whitney p = {pval:.3g}  AUC = {auc:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
