"""``python -m t2i_mia.attack``: the membership inference audit (the main job).

With no arguments it runs a complete audit on the embedded default: the synthetic captioned
data set, a small latent diffusion target and a shadow model trained here (cached in
--work-dir), the adversary's CLIP encoder trained on the auxiliary split, the four attacks
of Wu et al. (2022), controls, and the report in --out.
"""

from __future__ import annotations

import logging
import sys

from t2i_mia import cli

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
  The report gives AUC, accuracy, balanced accuracy, TPR at 1% and 0.1% FPR with 95%
  bootstrap CIs, and two controls (null_target, shuffled_labels) whose AUC must be ~0.5.

examples:
  python -m t2i_mia.attack                          # the embedded default audit (tiny)
  python -m t2i_mia.attack --config ci              # a ~1-2 minute audit
  python -m t2i_mia.attack --set adversary.k=8 --set adversary.caption_source=captioner
  python -m t2i_mia.attack --target generations --target-dir gens/ --data folder \\
      --data-dir my_data/manifest.jsonl
  python -m t2i_mia.attack --dry-run
"""


def main(argv=None) -> int:
    parser = cli.make_parser("python -m t2i_mia.attack", DESCRIPTION, EPILOG)
    args = parser.parse_args(argv)
    cli.setup_logging(args.verbose)
    cfg, paths = cli.resolve(args)
    if args.dry_run:
        print(cli.plan(cfg, paths, "membership inference audit"))
        return 0
    from t2i_mia.audit import run_audit
    run_audit(cfg, paths)
    logging.getLogger("t2i_mia").info("report written to %s", paths.out)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
