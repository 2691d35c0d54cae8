"""What a figure was measured on: a seen anomaly is never scored (another draw on --resume,
data moved to other folders), the protocol identifies the data (counts, test-file fingerprint,
skipped files) and result tables hold no machine path."""
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, synthetic_dataset, tiny_dmad_net, tiny_net
from dualmem.tools import collect_results as C


def main(tool, argv):
    from dualmem.tools import train_unified, train_val

    module = {"train_val": train_val, "train_unified": train_unified}[tool]
    return module.main([str(a) for a in argv] + ["--no_progress", "--device", "cpu",
                                                 "--threads", "1"])


def scored_files(evaluation):
    import csv

    with open(evaluation / "scores.csv") as f:
        return {r["file"] for r in csv.DictReader(f)}


def newest_evaluation(run):
    return sorted((run / "evaluations").iterdir())[-1]


def dmad_config(tmp_path, dataset, name="semi.yaml", **seen):
    cfg = {"_base_": str(ROOT / "experiments" / "demo" / "dmad.yaml"), "random_seed": 1,
           "net": tiny_dmad_net(), "trainer": {"max_epoch": 1, "val_freq_epoch": 1},
           "dataset": {**dataset, "seen_anomalies": {"num_per_class": 1, "seed": 0, **seen}}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------- item 3: another draw
@pytest.mark.slow
def test_another_seen_anomaly_draw_on_resume_is_refused_and_the_set_only_grows(
        tmp_path, capsys):
    """The DMAD banks and weights keep the first draw: a resume with another seed would score
    it (in its own results and in any later --evaluate). Refused, naming the files, with
    nothing written; a nested draw (k = 2 holds k = 1) is accepted and the run remembers both,
    so going back to k = 1 is refused too."""
    data = synthetic_dataset(tmp_path / "data", seed=3, image_size=64, num_train=6,
                             num_test_good=2, num_test_defect=3, batch_size=8)
    run = tmp_path / "run"
    assert main("train_val", ["--config", dmad_config(tmp_path, data), "--work_dir", run]) == 0
    first = json.loads((run / "run.json").read_text())
    draw1 = first["seen_anomalies"]["files"]
    assert len(draw1) == 2
    assert sorted(n for names in first["trained_on"].values() for n in names) == sorted(draw1)
    config_before = (run / "config.yaml").read_text()

    code = main("train_val", ["--work_dir", run, "--resume", "--override", "--opts",
                              "dataset.seen_anomalies.seed=1", "trainer.max_epoch=2"])
    err = capsys.readouterr().err
    assert code == 2, err
    from dualmem.datasets.manifest import read_manifest
    from dualmem.datasets.seen_anomalies import split_seen_anomalies

    redrawn, _ = split_seen_anomalies(read_manifest(tmp_path / "data" / "test.json"), 1, seed=1)
    back_in_test = set(draw1) - {r["filename"] for r in redrawn}
    assert back_in_test
    assert "was trained on or banked" in err and all(f in err for f in back_in_test), err
    assert err.count("\n") == 1  # one line
    # refused before anything was written: the record and the config are as they were
    assert json.loads((run / "run.json").read_text()) == first
    assert (run / "config.yaml").read_text() == config_before
    # and a plain evaluation never scores the first draw
    assert main("train_val", ["--work_dir", run, "--evaluate"]) == 0
    assert not scored_files(newest_evaluation(run)) & set(draw1)

    # k = 2 with the same seed holds the k = 1 draw: accepted, the set grows
    assert main("train_val", ["--work_dir", run, "--resume", "--override", "--opts",
                              "dataset.seen_anomalies.num_per_class=2",
                              "trainer.max_epoch=2"]) == 0, capsys.readouterr().err
    grown = json.loads((run / "run.json").read_text())
    draw2 = grown["seen_anomalies"]["files"]
    assert set(draw1) < set(draw2) and len(draw2) == 4
    assert sorted(n for names in grown["trained_on"].values() for n in names) == sorted(draw2)
    import torch

    state = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    assert set(draw2) <= {n for names in state["trained_on"].values() for n in names}
    # back to k = 1: the second draw's extra images would be scored; refused, named
    code = main("train_val", ["--work_dir", run, "--resume", "--override", "--opts",
                              "dataset.seen_anomalies.num_per_class=1",
                              "trainer.max_epoch=3"])
    err = capsys.readouterr().err
    extra = sorted(set(draw2) - set(draw1))
    assert code == 2 and all(f in err for f in extra), err
    # an --evaluate under the first draw's config is refused the same way
    code = main("train_val", ["--work_dir", run, "--evaluate", "--override", "--opts",
                              "dataset.seen_anomalies.num_per_class=1"])
    err = capsys.readouterr().err
    assert code == 2 and all(f in err for f in extra), err


# ------------------------------------------------------------------- item 4: moved multi-root
@pytest.mark.slow
def test_a_multi_root_run_evaluated_on_moved_data_refuses_its_seen_anomalies(
        tmp_path, capsys):
    """Files are identified by class and name relative to their root: moving both roots does
    not let the seen anomalies back into the test set; the record names them relative."""
    from dualmem.datasets.synthetic import generate_synthetic_dataset

    roots = {}
    for name, cls in (("A", "disc"), ("B", "weave")):
        roots[name] = tmp_path / "data" / name
        generate_synthetic_dataset(roots[name], classes=[cls], image_size=64, num_train=6,
                                   num_test_good=2, num_test_defect=1, seed=2)
    data = {"type": "mvtec", "input_size": [64, 64], "batch_size": 8, "workers": 0,
            "cache_dir": str(tmp_path / "cache")}
    cfg = dmad_config(tmp_path, data)
    run = tmp_path / "run"
    assert main("train_unified", ["--config", cfg, "--data_root", roots["A"], "--data_root",
                                  roots["B"], "--work_dir", run]) == 0
    seen = json.loads((run / "run.json").read_text())["seen_anomalies"]["files"]
    assert len(seen) == 2
    assert not any(Path(f).is_absolute() for f in seen), seen  # relative to their root
    assert {f.split("/")[0] for f in seen} == {"disc", "weave"}

    moved = {}
    for name in roots:
        moved[name] = tmp_path / "moved" / f"{name}_copy"
        shutil.copytree(roots[name], moved[name])
        shutil.rmtree(roots[name])
    code = main("train_unified", ["--work_dir", run, "--evaluate", "--data_root", moved["A"],
                                  "--data_root", moved["B"], "--override", "--opts",
                                  "dataset.seen_anomalies.num_per_class=0"])
    err = capsys.readouterr().err
    assert code == 2 and "was trained on or banked" in err, err
    assert all(f in err for f in seen), err
    assert not (run / "evaluations").exists() or not any((run / "evaluations").iterdir())
    # the run's own draw on the moved data: accepted, the seen anomalies stay out
    assert main("train_unified", ["--work_dir", run, "--evaluate", "--data_root", moved["A"],
                                  "--data_root", moved["B"], "--override"]) == 0
    out = newest_evaluation(run)
    assert scored_files(out)
    assert not {Path(f).relative_to(Path(f).parents[3]).as_posix()
                for f in scored_files(out)} & set(seen)


# --------------------------------------------------------------- item 12: what data, per class
def _png(path, size, value=90):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def test_the_test_file_fingerprint_follows_the_files_not_the_folder(tmp_path):
    """Resized copies or an added image change the fingerprint (and the count); the same files
    in another folder do not."""
    from dualmem.datasets.manifest import data_summary

    def tree(root, size, n=3):
        for i in range(n):
            _png(root / "bottle" / "test" / "good" / f"{i:03d}.png", size, 40 + i)
        recs = [{"filename": str(root / "bottle" / "test" / "good" / f"{i:03d}.png"),
                 "label": 0, "clsname": "bottle"} for i in range(n)]
        return recs

    train = [{"filename": "bottle/train/good/000.png", "label": 0, "clsname": "bottle"}]
    big = data_summary(train, tree(tmp_path / "orig", (90, 90)), roots=[tmp_path / "orig"])
    same = data_summary(train, tree(tmp_path / "moved", (90, 90)), roots=[tmp_path / "moved"])
    small = data_summary(train, tree(tmp_path / "small", (26, 26)), roots=[tmp_path / "small"])
    more = data_summary(train, tree(tmp_path / "more", (90, 90), n=4),
                        roots=[tmp_path / "more"])
    assert big == same
    assert big["bottle"]["test"] == small["bottle"]["test"] == 3
    assert small["bottle"]["test_files"] != big["bottle"]["test_files"]
    assert more["bottle"]["test"] == 4 and more["bottle"]["test_files"] != big["bottle"][
        "test_files"]
    assert big["bottle"] | {"test_files": None} == {"train": 1, "test": 3, "test_files": None,
                                                    "skipped": []}


ABSOLUTE = re.compile(r"(^|[\s'\"=,(\[{:])/(tmp|work|home|root|data|Users|var|mnt)\b")


@pytest.mark.slow
def test_results_and_collect_results_name_the_data_and_no_machine_path(tmp_path, capsys):
    """A skipped test image is in results.md and the tables (not only in log.txt); per-class
    counts and the fingerprint show there; another copy of the data differs in collect_results;
    no absolute path in any collect_results output."""
    data = synthetic_dataset(tmp_path / "data", seed=4, image_size=64, num_train=4,
                             num_test_good=2, num_test_defect=1, batch_size=8)
    cfg = {"_base_": str(ROOT / "configs" / "runtime.yaml"), "random_seed": 5,
           "dataset": {**data, "on_bad_file": "skip"},
           "trainer": {"max_epoch": 1, "val_freq_epoch": 1,
                       "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}},
                       "lr_scheduler": None},
           "net": tiny_net()}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from dualmem.datasets.synthetic import ensure_synthetic_dataset

    params = dict(data["synthetic"])
    root = Path(params.pop("root"))
    ensure_synthetic_dataset(root, **params)
    broken = root / "disc" / "test" / "good" / "001.png"
    broken.write_bytes(b"not a png")
    run = tmp_path / "runs" / "one"
    assert main("train_val", ["--config", path, "--work_dir", run]) == 0
    res = json.loads((run / "results.json").read_text())
    d = res["protocol"]["data"]
    assert set(d) == {"disc", "weave"}
    assert d["disc"]["skipped"] == ["test: disc/test/good/001.png"] and d["weave"]["skipped"] == []
    n_defects = {c: len(list((root / c / "test").iterdir())) - 1 for c in d}
    for c in d:
        assert d[c]["train"] == 4
        assert d[c]["test"] == 2 + n_defects[c] - (c == "disc")
        assert re.fullmatch(r"[0-9a-f]{12}", d[c]["test_files"])
    md = (run / "results.md").read_text()
    assert "disc/test/good/001.png" in md and d["disc"]["test_files"] in md
    assert re.search(r"\| disc +\| 4 +\| %d " % d["disc"]["test"], md), md
    # the image repaired (one more test image): an evaluation says the data changed
    _png(broken, (64, 64))
    assert main("train_val", ["--work_dir", run, "--evaluate"]) == 0
    again = json.loads((newest_evaluation(run) / "results.json").read_text())["protocol"]
    assert again["data"]["disc"]["test"] == d["disc"]["test"] + 1
    assert again["data_changed"] == [f"disc: test {d['disc']['test']} -> "
                                     f"{d['disc']['test'] + 1}, test_files "
                                     f"{d['disc']['test_files']} -> "
                                     f"{again['data']['disc']['test_files']}"]

    # another copy of the data (the broken image repaired: one more test image, other bytes)
    other = json.loads(json.dumps(res))
    other["protocol"]["data"]["disc"].update(test=d["disc"]["test"] + 1, test_files="0" * 12,
                                              skipped=[])
    # an older result: absolute seen-anomaly files and a data root in its opts
    old = json.loads(json.dumps(res))
    del old["protocol"]["data"]
    old["protocol"]["seen_anomalies"] = {
        "num_per_class": 1, "files": [f"{tmp_path}/shared/data/syn_64/disc/test/hole/000.png"]}
    old["protocol"]["opts"] = [f"dataset.data_root={tmp_path}/shared/data/syn_64"]
    for name, body in (("other", other), ("old", old)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "results.json").write_text(json.dumps(body))
    prefix = tmp_path / "tables" / "cmp"
    assert C.main([str(tmp_path / "runs" / n) for n in ("one", "other", "old")] +
                  ["--per_class", "--out", str(prefix)]) == 0
    capsys.readouterr()
    texts = {ext: (tmp_path / "tables" / f"cmp.{ext}").read_text() for ext in ("md", "csv",
                                                                              "json")}
    for ext, text in texts.items():
        assert str(tmp_path) not in text and not ABSOLUTE.search(text), (ext, text)
    table = json.loads(texts["json"])
    assert "data" in table["varying"]
    assert table["runs_dir"] == "runs"
    rows = {(r["run"], r["class"]): r for r in table["rows"]}
    assert rows[("one", "disc")]["data"]["skipped"] == ["test: disc/test/good/001.png"]
    assert rows[("one", "mean")]["data"]["test"] == sum(d[c]["test"] for c in d)
    assert rows[("other", "disc")]["data"]["test_files"] == "0" * 12
    assert rows[("old", "mean")]["data"] is None
    assert rows[("old", "mean")]["protocol"]["seen_anomalies"]["files"] == [
        "syn_64/disc/test/hole/000.png"]
    assert rows[("old", "mean")]["protocol"]["opts"] == ["dataset.data_root=syn_64"]
    assert rows[("one", "mean")]["file"] == "runs/one/results.json"
    md_rows = [ln for ln in texts["md"].splitlines() if ln.startswith("| one ")]
    assert any(d["disc"]["test_files"] in ln for ln in md_rows)
    assert "- one: disc: test: disc/test/good/001.png" in texts["md"]
    assert "differs between runs:" in texts["md"] and "data" in texts["md"]
    assert "test: disc/test/good/001.png" in texts["csv"]
    # printed without --out: relative to the current folder, still no absolute path
    assert C.main([str(tmp_path / "runs"), "--format", "json"]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path) not in printed and not ABSOLUTE.search(printed)


def test_a_per_class_runs_combined_data_reads_per_class(tmp_path, capsys):
    """tools/train_per_class.py gives a protocol key that differs per class as {class: value};
    for ``data`` each value is that class's own {class: summary}: read as one summary each."""
    from dualmem.utils.results import _results_md

    summary = {c: {"train": 4, "test": n, "test_files": f"{c}0", "skipped": []}
               for c, n in (("a", 5), ("b", 6))}
    res = {"protocol": {"dataset": "x", "classes": ["a", "b"], "setting": "per-class",
                        "data": {c: {c: summary[c]} for c in summary}},
           "per_class": {"a": {"image_auroc": 0.5}, "b": {"image_auroc": 0.7}},
           "mean": {"image_auroc": 0.6}}
    (tmp_path / "pc").mkdir()
    (tmp_path / "pc" / "results.json").write_text(json.dumps(res))
    assert C.main([str(tmp_path / "pc"), "--per_class", "--format", "json"]) == 0
    rows = {r["class"]: r["data"] for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["a"] == summary["a"] and rows["mean"]["test"] == 11
    md = _results_md(res)
    assert re.search(r"\| b +\| 4 +\| 6 +\| b0 ", md) and re.search(r"\| all +\| 8 +\| 11 ", md)


# ------------------------------------------------------------------ item 16: committed tables
def test_committed_result_tables_hold_no_machine_path():
    tables = [p for p in (ROOT / "experiments").rglob("results/*") if p.is_file()]
    assert tables
    for p in tables:
        text = p.read_text(encoding="utf-8")
        assert not ABSOLUTE.search(text), (p, ABSOLUTE.search(text).group(0))
