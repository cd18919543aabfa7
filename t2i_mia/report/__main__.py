"""``python -m t2i_mia.report``: a report from per-query scores alone.

  python -m t2i_mia.report --scores OUT/scores.csv --null-scores OUT/null_scores.csv \\
      --out DIR

recomputes every metric, CI, control and held-out operating point of an audit from its
``scores.csv`` (attack-training and evaluated rows) and ``null_scores.csv`` (the null
model's), and writes DIR/report.json, report.md and roc.png. Same files, same numbers as the
audit (thresholds are refitted on the attack-training rows, MLP decisions are logit > 0,
the bootstrap uses the audit's seed and resample count unless --seed / --n-bootstrap say
otherwise). Without --null-scores the null-target blocks are reported as absent, with the
reason. Takes seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys

from t2i_mia.errors import T2IMiaError
from t2i_mia.report.scores import read_scores, report_from_scores
from t2i_mia.report.writer import format_table, write_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m t2i_mia.report",
                                description=__doc__.split("\n\n", 1)[1].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", required=True, metavar="CSV",
                   help="an audit's scores.csv (or a file in its format)")
    p.add_argument("--null-scores", default=None, metavar="CSV",
                   help="the null model's scores of the same evaluated queries")
    p.add_argument("--out", required=True, metavar="DIR", help="where report.json goes")
    p.add_argument("--n-bootstrap", type=int, default=None,
                   help="bootstrap resamples (default: the audit's)")
    p.add_argument("--seed", type=int, default=None, help="bootstrap seed (default: the audit's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    sc, meta, _ = read_scores(args.scores, args.null_scores)
    if args.n_bootstrap is not None:
        meta["n_bootstrap"] = args.n_bootstrap
    if args.seed is not None:
        meta["attack_seed"] = args.seed
    report, curves = report_from_scores(sc, meta)
    write_report(args.out, report, curves)
    print(format_table(report))
    logging.getLogger("t2i_mia").info("report written to %s", args.out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except T2IMiaError as e:  # a bad file: one clear line, exit status 2, nothing written
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
