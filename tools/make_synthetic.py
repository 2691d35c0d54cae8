"""Generate the synthetic MVTec-style demo dataset (and its train.json / test.json) into a folder.

    python tools/make_synthetic.py --out DIR [--seed S] [--classes disc weave ...]
        [--image-size 224] [--num-train 60] [--num-test-good 10] [--num-test-defect 4] [--force]

A complete copy made with the same arguments is kept as it is (``--force`` regenerates it). The
demo configs do this on their own (``dataset.type: synthetic``); this tool is for a copy
elsewhere or with other counts.
"""
import argparse
import os
import sys
import time

if not __package__:  # run as a script: `dualmem` is this checkout
    import _checkout  # noqa: F401

from dualmem.datasets.synthetic import (CLASS_SPECS, DEFAULT_IMAGE_SIZE,  # noqa: E402
                                DEFAULT_NUM_TEST_DEFECT, DEFAULT_NUM_TEST_GOOD,
                                DEFAULT_NUM_TRAIN, ensure_synthetic_dataset)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python tools/make_synthetic.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="dataset root to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", nargs="+", default=None, choices=list(CLASS_SPECS))
    ap.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    ap.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN)
    ap.add_argument("--num-test-good", type=int, default=DEFAULT_NUM_TEST_GOOD)
    ap.add_argument("--num-test-defect", type=int, default=DEFAULT_NUM_TEST_DEFECT,
                    help="test images per defect type")
    ap.add_argument("--force", action="store_true", help="regenerate even if complete")
    return ap.parse_args(argv)


def main(argv=None):
    from dualmem.datasets.manifest import read_manifest
    from dualmem.utils.errors import USER_ERRORS

    a = parse_args(argv)
    t0 = time.perf_counter()
    try:
        root = ensure_synthetic_dataset(a.out, force=a.force, classes=a.classes,
                                        image_size=a.image_size, num_train=a.num_train,
                                        num_test_good=a.num_test_good,
                                        num_test_defect=a.num_test_defect, seed=a.seed)
    except USER_ERRORS as exc:  # a bad count or size: one line, as every tool reports it
        if os.environ.get("DUALMEM_DEBUG") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train, test = read_manifest(root / "train.json"), read_manifest(root / "test.json")
    print(f"synthetic dataset ready at {root} ({len(train)} train, {len(test)} test images, "
          f"{time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
