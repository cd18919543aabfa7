"""``python -m t2i_mia.attack``: the membership inference audit (the main job).

With no arguments it runs a complete audit on the embedded default: the synthetic captioned
data set; a small latent diffusion target and a shadow model, each fine-tuned here (cached in
--work-dir) from the base LDM of the public components shipped in the package (which also
give the autoencoder and the adversary's CLIP encoder); the four attacks of Wu et al. (2022),
the calibrated attack against the base, controls, and the report in --out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

from t2i_mia import cli
from t2i_mia.config import validate
from t2i_mia.pipeline.audit import audit, write_audit
from t2i_mia.report.summary import write_summary
from t2i_mia.report.writer import format_table

DESCRIPTION = __doc__.split("\n\n", 1)[1].strip() if __doc__ else ""

EPILOG = """\
what it computes:
  For each evaluated query (target_members vs target_nonmembers) the adversary queries the
  target with the caption (ground truth, or its own retrieval captioner) for k images, and
  compares them with the query: Attack I pixel (MSE, L1, SSIM), II semantic (encoder
  embedding cosine / L2 + embeddings), III faithfulness (caption-image similarity), IV all
  combined. Each attack is an MLP (and a threshold per feature) fitted on attack-training
  data from a shadow model (default) or from known target members (--set
  adversary.aux_mode=partial), then applied once to the evaluation set.
  A fifth, calibrated attack (beyond the paper) compares each query's distances on the
  target with those on a reference model that never saw it (offline LiRA).
  Every entry gives AUC, accuracy, balanced accuracy, TPR at 1% and 0.1% FPR read off the
  ROC (an oracle threshold) and at a threshold fixed on attack-training data (with its
  realised FPR), 95% CIs, and the same attack's AUC on a null model that never saw the
  members. Controls (null_target with a Holm-corrected alarm, shuffled_labels, and blind:
  an attack on the query alone, which fires when members and non-members differ in
  distribution) must read ~0.5. --seeds runs independent audits and summarises their spread.

your own model:
  --target-dir DIR --members PATH --nonmembers PATH [--aux PATH] [--null-target-dir DIR]
  audits a given checkpoint on the images it was and was not trained on (folders of images
  + .txt captions, or JSONL manifests; validated before any model loads). The attacks are
  fitted on a known 20% of the sets (aux_mode partial, the default), on your shadow model
  (--shadow-dir, aux_mode shadow) or not at all (--set adversary.aux_mode=none: each
  feature scored with the intuitions' sign). The encoder is adversary.encoder.dir or trained
  on --aux. No model of the target's kind is trained: a generations audit in none mode takes
  seconds (80 + 80 queries, k = 2, a given encoder: 8 s wall on 2 CPU cores, cold).

examples:
  python -m t2i_mia.attack                          # the embedded default audit (tiny)
  python -m t2i_mia.attack --config ci              # the tests' audit (times below)
  python -m t2i_mia.attack --set adversary.k=8 --set adversary.caption_source=captioner
  python -m t2i_mia.attack --target generations --target-dir gens/ --data folder \\
      --data-dir my_data/manifest.jsonl
  python -m t2i_mia.attack --target ldm --target-dir my_sd/ --members m/ --nonmembers n/ \\
      --aux a/ --null-target-dir base_sd/
  python -m t2i_mia.attack --config ci --seeds 1,2,3  # OUT/seed_<s>/ + OUT/summary.md
  python -m t2i_mia.attack --dry-run
"""


def _audit_and_write(cfg, paths) -> dict:
    """One audit: the typed result, its files in ``paths.out``, its table on stdout."""
    result = audit(cfg, paths)
    write_audit(result, paths.out)
    report = result.report.to_dict()
    print(format_table(report))
    return report


def main(argv=None) -> int:
    parser = cli.make_parser("python -m t2i_mia.attack", DESCRIPTION, EPILOG,
                             explicit_sets=True)
    parser.add_argument("--seeds", default=None, metavar="S,S,...",
                        help="run one independent audit per seed (its own splits, models, "
                             "shadow, references, attack fits) into OUT/seed_<s>/, then "
                             "OUT/summary.json and summary.md: mean, sd, min and max over "
                             "seeds. Not with --seed.")
    args = parser.parse_args(argv)
    cli.setup_logging(args.verbose)
    seeds = cli.parse_seeds(args.seeds, args.seed)
    cfg, paths = cli.resolve(args)
    if args.dry_run:
        print(cli.plan(cfg, paths, "membership inference audit"))
        if seeds:
            print(f"  seeds         {', '.join(map(str, seeds))}: {paths.out}/seed_<s>/, "
                  f"{paths.out}/summary.json, summary.md")
        return 0
    cli.use_compile_cache(paths.work_dir, not args.no_compile_cache)
    if not seeds:
        _audit_and_write(cfg, paths)
        logging.getLogger("t2i_mia").info("report written to %s", paths.out)
        return 0
    reports = []
    for s in seeds:
        cfg_s = validate(dataclasses.replace(cfg, seed=s))
        out_s = os.path.join(paths.out, f"seed_{s}")
        logging.getLogger("t2i_mia").info("seed %d -> %s", s, out_s)
        reports.append(_audit_and_write(cfg_s, dataclasses.replace(paths, out=out_s)))
    write_summary(paths.out, reports, seeds)
    logging.getLogger("t2i_mia").info("summary of %d seeds written to %s/summary.md",
                                      len(seeds), paths.out)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
