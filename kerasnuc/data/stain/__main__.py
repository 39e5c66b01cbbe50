"""Command line of kerasnuc.data.stain.

    python -m kerasnuc.data.stain train-dcgmm --data monuseg:../shared/data/monuseg2018/train \\
        --template IMAGE --out DIR [--steps N --tile 128 --batch 8 --clusters 3 ...]
    python -m kerasnuc.data.stain normalize --stain DIR/dcgmm.json IMAGE... --out-dir DIR

``train-dcgmm`` trains the DCGMM E-step network without labels on ``--data`` (a dataset spec
or any folder of images), fits it on the template and writes ``DIR/model.keras`` and
``DIR/dcgmm.json``; ``"stain": {"method": "dcgmm", "model": "DIR", "template": IMAGE}`` in a
training config then uses it. ``normalize`` applies any stored normaliser (a stain.json of a
run or a dcgmm.json) to images and writes PNGs.
"""

import argparse
import json
import os
import sys

PROG = "python -m kerasnuc.data.stain"


def _train(args):
    from kerasnuc.data.imageio import read_image
    from kerasnuc.data.stain.core import StainNormalizer
    from kerasnuc.data.stain.dcgmm_train import JSON_FILE, read_unlabelled, train_dcgmm, write_dcgmm

    # the inputs first: a template without tissue or a bad data path fails before training
    template = read_image(args.template, channels=3)
    try:
        StainNormalizer()._tissue(template)
    except ValueError as error:
        raise ValueError(f"template {args.template}: {error}") from None
    images = read_unlabelled(args.data, min_side=args.tile)
    print(f"{PROG} train-dcgmm: {len(images)} images from {args.data}", flush=True)
    network, summary = train_dcgmm(
        [rgb for _, rgb in images], steps=args.steps, tile=args.tile, batch=args.batch,
        clusters=args.clusters, filters=args.filters, depth=args.depth, learning_rate=args.lr,
        seed=args.seed, log=lambda line: print(line, flush=True), log_every=args.log_every)
    summary["data"] = args.data
    normalizer = write_dcgmm(args.out, network, template, args.template, summary)
    fractions = ", ".join(f"{100 * w:.1f}%" for w in normalizer.weights_)
    print(f"{PROG} train-dcgmm: done in {summary['seconds']:.0f} s; validation NLL "
          f"{summary['validation_nll_before']:.4f} -> {summary['validation_nll_after']:.4f}; "
          f"template classes {fractions}; wrote {os.path.join(args.out, 'model.keras')} and "
          f"{os.path.join(args.out, JSON_FILE)}", flush=True)
    return 0


def _normalize(args):
    from kerasnuc.data.imageio import read_image, write_png_atomic
    from kerasnuc.data.stain import normalizer_from_dict

    with open(args.stain, encoding="utf-8") as handle:
        normalizer = normalizer_from_dict(json.load(handle), os.path.dirname(os.path.abspath(args.stain)))
    os.makedirs(args.out_dir, exist_ok=True)
    for path in args.images:
        out = normalizer.transform(read_image(path, channels=3))
        target = os.path.join(args.out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        write_png_atomic(target, out)
        print(f"{PROG} normalize: {path} -> {target}", flush=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description="kerasnuc stain normalisation tools")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train-dcgmm", help="train a DCGMM normaliser on unlabelled H&E images")
    train.add_argument("--data", required=True, help="dataset spec (monuseg:PATH, ...) or a folder of images")
    train.add_argument("--template", required=True, help="template image whose colours others are mapped to")
    train.add_argument("--out", required=True, help="output folder (model.keras, dcgmm.json)")
    train.add_argument("--steps", type=int, default=2000, help="training steps (paper: 100,000)")
    train.add_argument("--tile", type=int, default=128, help="side of the random training crops")
    train.add_argument("--batch", type=int, default=8, help="crops per step")
    train.add_argument("--clusters", type=int, default=3, help="mixture classes K (nuclei, tissue, background)")
    train.add_argument("--filters", type=int, default=16, help="U-Net filters at full resolution")
    train.add_argument("--depth", type=int, default=2, help="U-Net pooling levels")
    train.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (paper: 1e-4)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--log-every", type=int, default=50, help="steps per progress line")
    normalize = commands.add_parser("normalize", help="apply a stored normaliser (stain.json, dcgmm.json)")
    normalize.add_argument("--stain", required=True, help="JSON of a fitted normaliser")
    normalize.add_argument("--out-dir", required=True)
    normalize.add_argument("images", nargs="+")
    args = parser.parse_args(argv)
    try:
        return _train(args) if args.command == "train-dcgmm" else _normalize(args)
    except (ValueError, OSError) as error:  # DataError, a bad template, a missing file
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
