"""Write UniAD JSON-lines manifests (train.json, test.json) for a dataset as distributed.

    python tools/prepare_data.py mvtec   --root DATA/mvtec [--classes bottle cable] [--out DIR]
    python tools/prepare_data.py visa    --root DATA/VisA_20220922 [--classes candle]
    python tools/prepare_data.py cifar10 --root DATA/cifar10 --normal 0 1 2 3 4 [--seed 0]
    python tools/prepare_data.py folder  --good G [--bad B] [--masks M] [--test-split 0.2]
    python tools/prepare_data.py ader    --meta DATA/mvtec/meta.json

Manifest paths are relative to the printed image_dir. Dataset folders are never written to by
default: --out defaults to ./data/manifests/<SOURCE> (relative to the current folder; an error
if that lies inside the dataset); an explicit --out is written wherever it points. CIFAR-10
pickles are exported as PNG files to <out>/cifar10_png. Training tools can skip this step:
``--data_root DIR`` prepares the same manifests and caches them in $DUALMEM_CACHE_DIR (else
$XDG_CACHE_HOME/dualmem, else ~/.cache/dualmem).
"""
import argparse
import sys
from pathlib import Path

if not __package__:  # run as a script: `dualmem` is this checkout
    import _checkout  # noqa: F401


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")

    def common(sp, classes=True):
        sp.add_argument("--out", default=None,
                        help="folder for train.json/test.json (default: "
                             "./data/manifests/SOURCE; never the dataset folder)")
        sp.add_argument("--no-check", dest="check", action="store_false",
                        help="skip opening every image/mask header (faster, less safe)")
        if classes:
            sp.add_argument("--classes", nargs="+", default=None, help="only these classes")

    sp = sub.add_parser("mvtec", help="any MVTec-AD-layout tree")
    sp.add_argument("--root", required=True)
    common(sp)
    sp = sub.add_parser("visa", help="VisA release (split_csv/1cls.csv) or a converted tree")
    sp.add_argument("--root", required=True)
    common(sp)
    sp = sub.add_parser("cifar10", help="CIFAR-10 pickles or class-folder tree, UniAD protocol")
    sp.add_argument("--root", required=True)
    sp.add_argument("--normal", nargs="+", default=["0", "1", "2", "3", "4"],
                    help="normal classes: indices, names or a split string like 02468")
    sp.add_argument("--seed", type=int, default=0, help="draw of the anomalous test images")
    common(sp, classes=False)
    sp = sub.add_parser("folder", help="your own images")
    sp.add_argument("--good", required=True, help="folder of normal images")
    sp.add_argument("--bad", default=None, help="folder of defective images (test only)")
    sp.add_argument("--masks", default=None, help="folder of masks for the defective images")
    sp.add_argument("--test-split", type=float, default=0.2,
                    help="fraction of good images held out for testing (default 0.2)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--class-name", default=None,
                    help="clsname (default: the folder holding the good folder)")
    sp.add_argument("--root", default=None, help="image root (default: the folders' parent)")
    common(sp, classes=False)
    sp = sub.add_parser("ader", help="ADer's meta.json")
    sp.add_argument("--meta", required=True, help="meta.json or the folder holding it")
    sp.add_argument("--root", default=None, help="image root (default: the meta file's folder)")
    common(sp)
    return p.parse_args(argv)


def build(args):
    from dualmem.datasets.prepare import build_source

    if args.source == "folder":
        from dualmem.datasets.prepare import folder

        return folder.build(args.good, args.bad, args.masks, args.test_split, args.seed,
                            args.class_name, args.root)
    if args.source == "ader":
        from dualmem.datasets.prepare import ader

        return ader.build(args.meta, args.root, args.classes)
    if args.source == "cifar10":
        normal = args.normal[0] if len(args.normal) == 1 else args.normal
        from dualmem.datasets.prepare.cifar10 import find_layout

        kind, _ = find_layout(args.root)
        export = Path(args.out) / "cifar10_png" if kind == "pickle" else None
        return build_source("cifar10", args.root, export_dir=export, normal_classes=normal,
                            seed=args.seed)
    return build_source(args.source, args.root, classes=args.classes)


DEFAULT_OUT = Path("data") / "manifests"


def data_folders(args):
    """The folders the user named as data (resolved): a default --out must not lie there."""
    folders = []
    for key in ("root", "good", "bad", "masks", "meta"):
        value = getattr(args, key, None)
        if value:
            path = Path(value).expanduser().resolve()
            folders.append(path.parent if path.is_file() else path)
    if args.source == "folder" and not args.root:  # the image root is the folders' parent
        folders.append(Path(args.good).expanduser().resolve().parent)
    return folders


def default_out(args):
    """./data/manifests/<source>, refused when that is inside a dataset folder."""
    from dualmem.datasets.prepare import PrepareError

    out = (DEFAULT_OUT / args.source).resolve()
    for folder in data_folders(args):
        if out == folder or folder in out.parents:
            raise PrepareError(f"the default output {out} is inside the dataset folder "
                               f"{folder}, which is never written to by default; pass --out DIR")
    return out


def main(argv=None):
    args = parse_args(argv)
    from dualmem.datasets.prepare import (PrepareError, check_records, summary_table,
                                  write_prepared)

    try:
        args.out = str(Path(args.out).expanduser().resolve()) if args.out else \
            str(default_out(args))
        prepared = build(args)
        check_records(prepared, check_files=args.check)
        out = Path(args.out)
        try:
            train, test = write_prepared(prepared, out)
        except OSError as exc:
            raise PrepareError(f"cannot write manifests to {out} ({exc.strerror}); pass "
                               f"--out DIR") from None
    except (PrepareError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{prepared.source}\n")
    print(summary_table(prepared))
    for note in prepared.notes:
        print(f"note: {note}")
    print(f"\nwrote {train} ({len(prepared.train)} lines) and {test} "
          f"({len(prepared.test)} lines)\n\nconfig:\n"
          f"dataset:\n  image_reader:\n    kwargs:\n      image_dir: {prepared.image_dir}\n"
          f"  train:\n    meta_file: {train}\n  test:\n    meta_file: {test}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
