"""Time utils.metrics.compute_class_metrics on an MVTec-AD-sized synthetic test set.

Synthetic, seeded data: smooth background noise, 1-3 elliptical/irregular blob anomalies per
anomalous image (~73% anomalous as in MVTec-AD test), maps respond to the blobs with blur and
noise, plus some false-positive blobs in normal regions. Times all seven metrics split into the 15
MVTec class sizes and as one big class, for float16 maps (the fast exact path), float32 (sort path;
same values) and float32_distinct (float32 plus 1e-3 noise: almost all values distinct, worst
case). Peak memory: tracemalloc peak of a separate, untimed run (numpy buffers are traced) and the
process ru_maxrss.

    python tools/benchmark_metrics.py [--num-images 1725] [--size 224] [--out benchmark_metrics.json]
"""
import argparse
import os
import platform
import tracemalloc

import numpy as np

if not __package__:  # run as a script: `dualmem` is this checkout
    import _checkout  # noqa: F401
from dualmem.tools._bench import call_timed, max_rss_mb, write_json  # noqa: E402
from dualmem.utils.metrics import (METRIC_NAMES, compute_class_metrics,  # noqa: E402
                           image_score_from_map, summarize)

import cv2  # noqa: E402

# MVTec-AD test images per class (sum 1725); scaled when --num-images differs
MVTEC_COUNTS = [83, 150, 132, 117, 78, 110, 124, 115, 167, 160, 117, 42, 100, 79, 151]


def make_data(n, size, seed=0):
    """Seeded synthetic float16 maps and uint8 masks (n x size x size)."""
    rng = np.random.default_rng(seed)
    maps = np.empty((n, size, size), np.float16)
    masks = np.zeros((n, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        bg = cv2.resize(rng.normal(0, 1, (14, 14)).astype(np.float32), (size, size),
                        interpolation=cv2.INTER_CUBIC) * 0.15
        m = np.zeros((size, size), np.uint8)
        if rng.random() < 0.73:
            for _ in range(rng.integers(1, 4)):
                c = (int(rng.integers(0, size)), int(rng.integers(0, size)))
                ax = (int(rng.integers(2, size // 6)), int(rng.integers(2, size // 6)))
                cv2.ellipse(m, c, ax, float(rng.uniform(0, 180)), 0, 360, 1, -1)
            if rng.random() < 0.3:  # irregular (scratch-like / textured) defect
                t = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 4)
                centre = np.hypot(yy - size / 2, xx - size / 2) < size / 3
                m |= ((t > np.quantile(t, 0.985)) & centre).astype(np.uint8)
        fp = np.zeros((size, size), np.float32)
        if rng.random() < 0.4:  # false-positive response in normal texture
            cv2.circle(fp, (int(rng.integers(0, size)), int(rng.integers(0, size))),
                       int(rng.integers(3, 15)), float(rng.uniform(0.3, 1.0)), -1)
        resp = cv2.GaussianBlur(m.astype(np.float32) * rng.uniform(0.4, 1.5) + fp, (0, 0), 3)
        a = bg + resp + rng.normal(0, 0.08, (size, size)).astype(np.float32)
        maps[i] = np.clip(a, 0, None)
        masks[i] = m
    return maps, masks


def split_sizes(n):
    c = np.array(MVTEC_COUNTS, np.float64) * n / sum(MVTEC_COUNTS)
    sizes = np.floor(c).astype(int)
    sizes[np.argsort(c - sizes)[::-1][: n - sizes.sum()]] += 1
    return [int(s) for s in sizes if s > 0]


def run_split(maps, masks, scores, labels, sizes):
    per_class, a = {}, 0
    for k, s in enumerate(sizes):
        sl = slice(a, a + s)
        per_class[f"class{k:02d}"] = compute_class_metrics(
            scores[sl], labels[sl], maps[sl], masks[sl], METRIC_NAMES)
        a += s
    return per_class


def traced_peak_mib(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=1725)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtypes", default="float16,float32,float32_distinct",
                   help="map dtypes to time (comma list)")
    p.add_argument("--no-memory", action="store_true", help="skip the tracemalloc runs")
    p.add_argument("--out", default="benchmark_metrics.json")
    args = p.parse_args(argv)

    (maps, masks), t_gen = call_timed(lambda: make_data(args.num_images, args.size, args.seed))
    labels = masks.reshape(len(masks), -1).any(axis=1)
    scores, t_score = call_timed(lambda: image_score_from_map(maps, "max", kernel=16))
    sizes = split_sizes(args.num_images)
    result = {
        "num_images": args.num_images, "size": args.size, "pixels": int(maps.size),
        "anomalous_images": int(labels.sum()), "anomalous_pixel_fraction": float(masks.mean()),
        "classes": len(sizes), "class_sizes": sizes,
        "cpu_count": os.cpu_count(), "numpy": np.__version__, "python": platform.python_version(),
        "generate_s": round(t_gen, 2), "image_score_from_map_max_s": round(t_score, 3),
        "maxrss_after_data_mib": round(max_rss_mb(), 1), "runs": {},
    }
    print(f"{args.num_images} maps {args.size}x{args.size} = {maps.size / 1e6:.1f} M px, "
          f"{labels.sum()} anomalous, generated in {t_gen:.1f}s; "
          f"image_score_from_map(max,16) {t_score:.2f}s")

    for dt in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        if dt == "float32_distinct":
            m = maps.astype(np.float32)
            m += np.random.default_rng(args.seed + 1).random(m.shape, dtype=np.float32) * 1e-3
        else:
            m = maps if dt == "float16" else maps.astype(dt)
        for name, fn in (("15_classes", lambda: run_split(m, masks, scores, labels, sizes)),
                         ("one_class",
                          lambda: {"all": compute_class_metrics(scores, labels, m, masks)})):
            per_class, t = call_timed(fn)
            summ = summarize(per_class)
            run = {"seconds": round(t, 3), "summary": {k: (None if v is None else round(v, 5))
                                                        for k, v in summ.items()}}
            if not args.no_memory:
                run["tracemalloc_peak_mib"] = round(traced_peak_mib(fn), 1)
            run["maxrss_mib"] = round(max_rss_mb(), 1)
            result["runs"][f"{dt}/{name}"] = run
            mem = f", traced peak {run['tracemalloc_peak_mib']:.0f} MiB" if not args.no_memory else ""
            print(f"{dt:16s} {name:11s}: {t:6.2f} s{mem}, maxrss {run['maxrss_mib']:.0f} MiB | "
                  + " ".join(f"{k}={v:.4f}" for k, v in summ.items() if v is not None))
        del m

    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
