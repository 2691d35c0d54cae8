"""tools/benchmark.py on tiny configs: every variant computes the same maps, the cache removes
the backbone's FLOPs, heads with memory banks get them filled, and the JSON holds the figures.
(Speed itself is measured by running the script, never asserted here.)"""
import json

import pytest
import yaml

from conftest import ROOT, tiny_dmad_net, tiny_net
from dualmem.tools import benchmark


def write_config(tmp_path, net, criterion=None):
    cfg = {"_base_": str(ROOT / "configs" / "runtime.yaml"),
           "dataset": {"type": "synthetic", "input_size": [64, 64], "batch_size": 2},
           "net": net}
    if criterion:
        cfg["criterion"] = criterion
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(tmp_path, config, *extra):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--config", str(config), "--rounds", "1", "--steps", "1",
                           "--threads", "1", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_compare_uniad_paths_agree_and_cache_removes_backbone_flops(tmp_path):
    net = tiny_net()
    net[2]["kwargs"]["dropout"] = 0.1  # the fast dropout path is part of what is compared
    result = run(tmp_path, write_config(tmp_path, net), "--compare", "--channels_last")
    variants = result["variants"]
    assert list(variants) == ["reference fp32", "fast fp32", "fast bf16",
                              "fast fp32 channels-last"]
    ref, fast = variants["reference fp32"], variants["fast fp32"]
    assert fast["max_abs_map_diff_vs_first"] < 1e-4
    assert variants["fast fp32 channels-last"]["max_abs_map_diff_vs_first"] < 1e-4
    assert ref["train_step_gflop"] > fast["train_step_gflop"] > 0
    assert variants["fast bf16"]["train_step_gflop"] == fast["train_step_gflop"]
    for v in variants.values():
        assert v["train_img_per_s"] > 0 and v["eval_img_per_s"] > 0
        assert 0 < v["fraction_of_matmul"] and v["peak_rss_mb"] > 0
        assert len(v["train_step_s_rounds"]) == 1
        # the fraction is against the median of the per-round matmul measurements
        assert len(v["matmul_gflop_per_s_rounds"]) == 1
        assert v["matmul_gflop_per_s"] == v["matmul_gflop_per_s_rounds"][0]
        assert v["fraction_of_matmul"] == pytest.approx(
            v["achieved_gflop_per_s"] / v["matmul_gflop_per_s"], rel=1e-9)
    assert result["bank_build_s"] is None


def test_dmad_banks_are_filled_and_its_own_loss_is_used(tmp_path):
    net = tiny_dmad_net()
    criterion = [{"name": "focal", "type": "models.heads.dmad.PatchFocalLoss",
                  "kwargs": {"weight": 1.0}}]
    result = run(tmp_path, write_config(tmp_path, net, criterion), "--compare",
                 "--bank_images", "4")
    assert result["bank_build_s"] > 0
    fast = result["variants"]["fast fp32"]
    assert fast["max_abs_map_diff_vs_first"] < 1e-5
    # DMAD's step retrieves from the banks: FLOPs beyond the score head's convolutions
    assert fast["train_step_gflop"] > 0


def test_benchmark_tools_share_the_measurements_and_results_writer(tmp_path, capsys):
    """Each benchmark tool times, reads peak memory and writes its JSON through tools/_bench.py
    (one implementation of each), and the results file is written atomically."""
    import re

    from dualmem.tools import _bench

    for path in sorted((ROOT / "tools").glob("benchmark*.py")):
        text = path.read_text(encoding="utf-8")
        for own in (r"json\.dump\(", r"\.write_text\(", r"getrusage", r"open\(\"/proc/self/",
                    r"time\.perf_counter\(", r"^def (median|timed|maxrss_mib|_status_mb)\("):
            assert not re.search(own, text, re.M), f"{path.name} re-implements {own}"
    out = tmp_path / "r.json"
    _bench.write_json(out, {"a": [1, 2]})
    assert out.read_text() == json.dumps({"a": [1, 2]}, indent=2)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind
    assert capsys.readouterr().out == f"written {out}\n"
    assert _bench.call_timed(lambda: 7)[0] == 7 and _bench.max_rss_mb() > 0
