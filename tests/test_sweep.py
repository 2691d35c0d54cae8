"""tools/sweep.py: a grid of tiny DuMeNet runs ends in one table; failing cells are recorded."""
import json

import pytest
import yaml

from conftest import ROOT, tiny_net
from dualmem.tools import sweep


def make_config(tmp_path):
    net = tiny_net(hidden_dim=16)
    net[2]["type"] = "models.reconstructions.UniADMemory"
    net[2]["kwargs"].update(channel_memory_size=4, spatial_memory_size=4, ssim_window=3)
    cfg = {
        "_base_": str(ROOT / "configs" / "runtime.yaml"),
        "random_seed": 7,
        "dataset": {
            "type": "synthetic",
            "synthetic": {"root": str(tmp_path / "data"), "seed": 3, "classes": ["disc"],
                          "image_size": 64, "num_train": 4, "num_test_good": 2,
                          "num_test_defect": 1},
            "input_size": [64, 64], "batch_size": 4, "workers": 0,
        },
        "trainer": {"max_epoch": 1, "val_freq_epoch": 1,
                    "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}}},
        "net": net,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_grid_parsing():
    from dualmem.utils import sweep  # the grid is library logic; tools/sweep.py parses arguments

    assert sweep.split_values("a,[1,2],'x,y'") == ["a", "[1,2]", "'x,y'"]
    grid = sweep.parse_grid(["net.2.kwargs.memory_mode=channel,both", "a.memory_mode=1"])
    assert grid == [("net.2.kwargs.memory_mode", ["channel", "both"]), ("a.memory_mode", ["1"])]
    assert sweep.cell_names(grid) == ["kwargs.memory_mode", "a.memory_mode"]
    for bad in (["novalue"], ["k="], ["k=a,,b"], ["k=1", "k=2"]):
        with pytest.raises(ValueError):
            sweep.parse_grid(bad)


@pytest.mark.slow
def test_two_cell_sweep_writes_one_table(tmp_path):
    cfg = make_config(tmp_path)
    work = tmp_path / "sweep"
    rc = sweep.main(["--config", str(cfg), "--work_dir", str(work), "--device", "cpu",
                     "--no_progress", "--grid", "net.2.kwargs.memory_mode=none,both",
                     "--opts", "net.2.kwargs.fusion_mode=gate"])
    assert rc == 0
    summary = json.loads((work / "sweep.json").read_text())
    cells = summary["cells"]
    assert [c["values"]["net.2.kwargs.memory_mode"] for c in cells] == ["none", "both"]
    assert all(c["status"] == "ok" for c in cells)
    for c in cells:
        assert 0.0 <= c["mean"]["pixel_auroc"] <= 1.0
        assert (tmp_path / "sweep" / c["name"] / "results.json").is_file()
        run_cfg = yaml.safe_load((tmp_path / "sweep" / c["name"] / "config.yaml").read_text())
        assert run_cfg["net"][2]["kwargs"]["memory_mode"] == c["values"][
            "net.2.kwargs.memory_mode"]
        assert run_cfg["net"][2]["kwargs"]["fusion_mode"] == "gate"
    md = (work / "sweep.md").read_text()
    assert "protocol:" in md
    # each cell's protocol names its opts; the table shows them once, as the grid's columns
    assert [c["protocol"]["opts"][-1] for c in cells] == [
        "net.2.kwargs.memory_mode=none", "net.2.kwargs.memory_mode=both"]
    assert "opts=" not in md and "| opts" not in md
    rows = [line for line in md.splitlines() if line.startswith("| none") or
            line.startswith("| both")]
    assert len(rows) == 2
    # the table shows each cell's mean pixel AUROC in %
    header = [h.strip() for h in md.splitlines()[md.splitlines().index(
        next(line for line in md.splitlines() if line.startswith("| memory_mode")))].split("|")]
    col = header.index("pixel_auroc")
    for row, c in zip(rows, cells):
        assert float(row.split("|")[col]) == pytest.approx(100 * c["mean"]["pixel_auroc"],
                                                           abs=0.006)
    # a cell's folder is a run of its own: evaluated from it alone, same figures
    from dualmem.tools import train_val

    cell = work / cells[1]["name"]
    assert train_val.main(["--work_dir", str(cell), "--evaluate", "--device", "cpu",
                           "--no_progress"]) == 0
    again = json.loads((sorted((cell / "evaluations").iterdir())[-1] /
                        "results.json").read_text())
    for key, value in cells[1]["mean"].items():
        if value is not None:
            assert again["mean"][key] == pytest.approx(value, abs=1e-6), key
    assert json.loads((cell / "run.json").read_text())["tool"] == "sweep"


@pytest.mark.slow
def test_failing_cells_are_recorded_and_the_sweep_goes_on(tmp_path):
    cfg = make_config(tmp_path)
    work = tmp_path / "sweep"
    rc = sweep.main(["--config", str(cfg), "--work_dir", str(work), "--device", "cpu",
                     "--no_progress", "--grid", "net.2.kwargs.memory_mode=dual",
                     "net.2.kwargs.fusion_mode=concat,gate"])
    assert rc == 1
    cells = json.loads((work / "sweep.json").read_text())["cells"]
    assert len(cells) == 2 and all(c["status"] == "failed" for c in cells)
    assert all("memory_mode must be one of" in c["error"] for c in cells)
    assert (work / cells[1]["name"] / "error.txt").is_file()
    md = (work / "sweep.md").read_text()
    assert md.count("failed") >= 4 and "protocol: no cell finished" in md
