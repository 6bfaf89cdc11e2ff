"""Convert official dataset releases into the layouts the DataModules read (`spec/datasets.md`).

    python -m datamodules.prepare <dataset> RAW_DIR OUT_DIR [--split-from DIR]

One module per dataset (``datamodules/prepare/<dataset>.py``) exports ``prepare(raw, out, split_from=None) ->
counts``; ``PREPARERS`` names them. Bad input raises ``PrepareError`` (one sentence naming the path, exit 2).
"""
from __future__ import annotations

import argparse
import sys

from datamodules.prepare import acdc, brats, la_nnunet
from lemis.errors import PrepareError

PREPARERS = {"acdc": acdc.prepare_acdc, "brats": brats.prepare_brats, "la-nnunet": la_nnunet.prepare_la_nnunet}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datamodules.prepare", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("dataset", help=f"dataset to convert ({', '.join(PREPARERS)})")
    parser.add_argument("raw", help="folder of the official release")
    parser.add_argument("out", help="output folder (the DataModule's data.root)")
    parser.add_argument("--split-from", default=None,
                        help="folder with train.list/val.list/test.list to copy (e.g. ../shared/data/ACDC)")
    args = parser.parse_args(argv)
    try:
        if args.dataset not in PREPARERS:
            raise PrepareError(f"no converter for {args.dataset!r} (there are: {', '.join(PREPARERS)})")
        counts = PREPARERS[args.dataset](args.raw, args.out, split_from=args.split_from)
    except PrepareError as err:
        print(f"lemis: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {', '.join(f'{n} {what}' for what, n in counts.items())} to {args.out}")
