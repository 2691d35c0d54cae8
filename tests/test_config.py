"""Config loading: _base_ merging, --opts overrides, path resolution and validation errors."""
import textwrap

import pytest

from dualmem.utils.config import ConfigError, load_config, merge_dicts


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def tree(tmp_path):
    write(tmp_path / "base" / "a.yaml", """
        random_seed: 1
        dataset:
          input_size: [224, 224]
          batch_size: 8
          image_reader: {type: opencv, kwargs: {image_dir: imgs, color_mode: RGB}}
        trainer: {max_epoch: 10, optimizer: {type: AdamW, kwargs: {lr: 0.1}}}
        """)
    write(tmp_path / "base" / "b.yaml", """
        random_seed: 2
        trainer: {max_epoch: 20, val_freq_epoch: 5}
        """)
    cfg = write(tmp_path / "exp" / "config.yaml", """
        _base_: [../base/a.yaml, ../base/b.yaml]
        dataset:
          batch_size: 4
          train: {meta_file: train.json}
        net:
          - {name: backbone, type: models.backbones.resnet18, kwargs: {pretrained: true}}
          - {name: neck, prev: backbone, type: models.necks.MFCN, kwargs: {outstrides: [16]}}
        """)
    return tmp_path, cfg


def test_bases_merge_in_order_then_own_keys(tree):
    root, path = tree
    cfg = load_config(path)
    assert cfg.random_seed == 2                      # b after a
    assert cfg.trainer.max_epoch == 20               # b overrides a
    assert cfg.trainer.optimizer.kwargs.lr == 0.1    # a's nested key survives the deep merge
    assert cfg.trainer.val_freq_epoch == 5
    assert cfg.dataset.batch_size == 4               # own key last
    assert cfg.dataset.input_size == [224, 224]


def test_relative_paths_resolve_against_the_defining_file(tree):
    root, path = tree
    cfg = load_config(path)
    assert cfg.dataset.image_reader.kwargs.image_dir == str((root / "base" / "imgs").resolve())
    assert cfg.dataset.train.meta_file == str((root / "exp" / "train.json").resolve())


def test_overrides_are_yaml_typed_and_index_lists(tree):
    _, path = tree
    cfg = load_config(path, ["trainer.max_epoch=3", "net.0.kwargs.pretrained=false",
                             "dataset.input_size=[128, 96]", "trainer.clip_max_norm=0.5",
                             "net.1.kwargs.outstrides=[8]"])
    assert cfg.trainer.max_epoch == 3 and isinstance(cfg.trainer.max_epoch, int)
    assert cfg.net[0].kwargs.pretrained is False
    assert cfg.dataset.input_size == [128, 96]
    assert cfg.trainer.clip_max_norm == 0.5
    assert cfg.net[1].kwargs.outstrides == [8]


def test_override_path_resolves_against_cwd(tree, monkeypatch):
    root, path = tree
    monkeypatch.chdir(root)
    cfg = load_config(path, ["dataset.train.meta_file=data/t.json"])
    assert cfg.dataset.train.meta_file == str((root / "data" / "t.json").resolve())


@pytest.mark.parametrize("opt, message", [
    ("net.5.kwargs.pretrained=false", "index 5 out of range"),
    ("net.x.kwargs=1", "indexes a list"),
    ("trainer.max_epoch", "must look like"),
])
def test_bad_overrides(tree, opt, message):
    _, path = tree
    with pytest.raises(ConfigError, match=message):
        load_config(path, [opt])


def test_misspelled_key_suggests_closest(tree):
    _, path = tree
    with pytest.raises(ConfigError, match=r"unknown key 'trainer.max_epochs'.*did you mean "
                                          r"'max_epoch'"):
        load_config(path, ["trainer.max_epochs=3"])


@pytest.mark.parametrize("opt, message", [
    ("trainer.max_epoch=ten", r"'trainer.max_epoch' must be int"),
    ("dataset.input_size=[224]", r"must have 2 elements"),
    ("dataset.batch_size=true", r"'dataset.batch_size' must be int"),
    ("dataset.image_reader.kwargs.color_mode=RGBA", r"must be one of"),
    ("net.1.prev=bakbone", r"'bakbone' names no earlier module"),
])
def test_wrong_types_and_impossible_values(tree, opt, message):
    _, path = tree
    with pytest.raises(ConfigError, match=message):
        load_config(path, [opt])


def test_missing_base_and_malformed_yaml(tmp_path):
    p = write(tmp_path / "c.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="_base_ file not found: nowhere.yaml"):
        load_config(p)
    p = write(tmp_path / "bad.yaml", "trainer:\n  max_epoch: [1, 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml at line"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_merge_replaces_lists_and_does_not_mutate():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    out = merge_dicts(base, {"a": {"c": [3]}})
    assert out == {"a": {"b": 1, "c": [3]}, "d": 1}
    assert base["a"]["c"] == [1, 2]


def test_demo_and_uniad_style_configs_load():
    from conftest import ROOT

    cfg = load_config(ROOT / "experiments" / "demo" / "config.yaml")
    assert cfg.net[2].type == "models.reconstructions.UniAD"
    assert cfg.dataset.synthetic.root == str((ROOT / "data" / "synthetic").resolve())


def test_changing_type_replaces_the_kwargs_block():
    base = {"lr_scheduler": {"type": "StepLR", "kwargs": {"step_size": 800, "gamma": 0.1}}}
    out = merge_dicts(base, {"lr_scheduler": {"type": "CosineAnnealingLR", "kwargs": {}}})
    assert out["lr_scheduler"] == {"type": "CosineAnnealingLR", "kwargs": {}}
    same = merge_dicts(base, {"lr_scheduler": {"type": "StepLR", "kwargs": {"gamma": 0.5}}})
    assert same["lr_scheduler"]["kwargs"] == {"step_size": 800, "gamma": 0.5}
    forced = merge_dicts(base, {"lr_scheduler": {"_delete_": True, "type": "StepLR"}})
    assert forced["lr_scheduler"] == {"type": "StepLR"}
    # a section that merely has a type (dataset) still merges key by key
    ds = merge_dicts({"dataset": {"type": "explicit", "batch_size": 8}},
                     {"dataset": {"type": "mvtec"}})
    assert ds["dataset"] == {"type": "mvtec", "batch_size": 8}


# ----------------------------------------------------------------------------- YAML 1.2 numbers

def test_config_file_exponent_floats_are_numbers(tree):
    root, _ = tree
    path = write(root / "exp" / "exp.yaml", """
        _base_: config.yaml
        trainer:
          optimizer: {type: AdamW, kwargs: {lr: 1e-4, weight_decay: 1E-5, eps: .5e-8}}
          clip_max_norm: 2.5e-3
          max_epoch: 12
        dataset:
          pixel_mean: [-2.5e-3, 0.5, 0.5]
        """)
    cfg = load_config(path)
    kw = cfg.trainer.optimizer.kwargs
    assert kw.lr == 1e-4 and isinstance(kw.lr, float)
    assert kw.weight_decay == 1e-5 and isinstance(kw.weight_decay, float)
    assert kw.eps == 0.5e-8 and isinstance(kw.eps, float)
    assert cfg.trainer.clip_max_norm == 2.5e-3 and cfg.dataset.pixel_mean[0] == -2.5e-3
    assert cfg.trainer.max_epoch == 12 and isinstance(cfg.trainer.max_epoch, int)
    assert cfg.net[0].kwargs.pretrained is True


def test_opts_exponent_float_is_a_number(tree):
    from dualmem.utils.config import parse_override

    assert parse_override("trainer.optimizer.kwargs.lr=1e-4") == (
        ["trainer", "optimizer", "kwargs", "lr"], 1e-4)
    for raw, want in [("1E5", 1e5), ("-2.5e-3", -2.5e-3), (".5", 0.5), ("3", 3),
                      ("true", True), ("null", None), ("[1e-4, 2]", [1e-4, 2])]:
        value = parse_override(f"k={raw}")[1]
        assert value == want and type(value) is type(want), raw
    _, path = tree
    cfg = load_config(path, ["trainer.optimizer.kwargs.lr=1e-4"])
    assert cfg.trainer.optimizer.kwargs.lr == 1e-4
    assert isinstance(cfg.trainer.optimizer.kwargs.lr, float)


def test_sweep_grid_exponent_values_are_numbers(tree):
    from dualmem.utils.sweep import parse_grid
    from dualmem.utils.config import parse_override

    [(key, values)] = parse_grid(["trainer.optimizer.kwargs.lr=1e-4,5e-4"])
    parsed = [parse_override(f"{key}={v}")[1] for v in values]
    assert parsed == [1e-4, 5e-4] and all(isinstance(v, float) for v in parsed)
    _, path = tree
    cfg = load_config(path, [f"{key}={values[1]}"])
    assert cfg.trainer.optimizer.kwargs.lr == 5e-4


def test_yaml_numbers_do_not_change_pyyaml_globally():
    import yaml

    import dualmem.utils.config  # noqa: F401  (the loader is defined on import)

    assert yaml.safe_load("1e-4") == "1e-4"


def test_string_for_a_number_names_key_and_file(tree):
    root, _ = tree
    write(root / "base" / "a.yaml", """
        trainer: {max_epoch: 10, optimizer: {type: AdamW, kwargs: {lr: abc}}}
        """)
    path = write(root / "exp" / "child.yaml", "_base_: ../base/a.yaml\n")
    with pytest.raises(ValueError, match=r"'trainer\.optimizer\.kwargs\.lr' must be a number, "
                                         r"got str 'abc' \(from .*base[/\\]a\.yaml\)"):
        load_config(path)


@pytest.mark.parametrize("opt, key", [
    ("trainer.optimizer.kwargs.lr=abc", "trainer.optimizer.kwargs.lr"),
    ("trainer.optimizer.kwargs.weight_decay=1e-4x", "trainer.optimizer.kwargs.weight_decay"),
    ("trainer.lr_scheduler={type: StepLR, kwargs: {step_size: ten, gamma: 0.1}}",
     "trainer.lr_scheduler.kwargs.step_size"),
])
def test_string_for_a_number_names_key_and_opts(tree, opt, key):
    _, path = tree
    with pytest.raises(ValueError) as info:
        load_config(path, [opt])
    message = str(info.value)
    line = next(ln for ln in message.splitlines() if f"'{key}'" in ln)
    assert "must be a number" in line and f"(from --opts {opt})" in line


def test_saved_floats_reload_as_floats(tree, tmp_path):
    from dualmem.utils.config import save_config

    _, path = tree
    cfg = load_config(path, ["trainer.optimizer.kwargs.lr=1e-4",
                             "trainer.optimizer.kwargs.eps=1e-20",
                             "trainer.clip_max_norm=1e20",
                             "net.0.kwargs.tag='1e5'"])
    out = tmp_path / "saved" / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    kw = again.trainer.optimizer.kwargs
    assert kw.lr == 1e-4 and kw.eps == 1e-20 and again.trainer.clip_max_norm == 1e20
    assert all(isinstance(v, float) for v in (kw.lr, kw.eps, again.trainer.clip_max_norm))
    assert again.net[0].kwargs.tag == "1e5"  # a string that looks like a number stays one


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _at(tree, dotted):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


# runtime.yaml keys whose left-out meaning is resolved by one function rather than DEFAULTS
RESOLVED_ELSEWHERE = {
    "version": "UniAD's format tag: nothing reads it",
    "dataset.resize": "utils.config_defaults.input_settings: left out means cv2_linear",
    "evaluator.key_metric": "utils.evaluator.evaluator_settings",
    "evaluator.metrics": "utils.evaluator.evaluator_settings",
    "evaluator.image_score.reduction": "utils.evaluator.evaluator_settings",
    "evaluator.image_score.kernel": "utils.evaluator.evaluator_settings",
}


def test_defaults_are_runtime_yaml_both_ways_and_a_bare_config_gets_them(tmp_path):
    """Every default is shown in configs/runtime.yaml as it is, and every value runtime.yaml
    shows is what a config that leaves it out gets: DEFAULTS, or the one function named."""
    import yaml

    from conftest import ROOT
    from dualmem.utils.config import load_config
    from dualmem.utils.config_defaults import DEFAULTS, input_settings
    from dualmem.utils.evaluator import evaluator_settings

    runtime = yaml.safe_load((ROOT / "configs" / "runtime.yaml").read_text())
    defaults = dict(_leaves(DEFAULTS))
    shown = dict(_leaves(runtime))
    for key, value in defaults.items():
        assert key in shown and shown[key] == value, key  # runtime.yaml shows every default
    for key, value in shown.items():  # and every value it shows is a default
        assert key in defaults or key in RESOLVED_ELSEWHERE, key
        if key in defaults:
            assert defaults[key] == value, key
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"net": []}))
    cfg = load_config(bare, validate=False)
    for key, value in defaults.items():
        assert _at(cfg, key) == value, key
    metrics, score, key_metric = evaluator_settings(cfg)
    ev = runtime["evaluator"]
    assert (metrics, key_metric) == (ev["metrics"], ev["key_metric"])
    assert {k: score[k] for k in ev["image_score"]} == ev["image_score"]
    assert input_settings(cfg) == ("RGB", "cv2_linear")  # a config from before the key
    assert input_settings(load_config(ROOT / "configs" / "runtime.yaml", validate=False)) \
        == ("RGB", "antialias")
    # a config's own value wins
    cfg = load_config(bare, ["trainer.max_epoch=3"], validate=False)
    assert cfg.trainer.max_epoch == 3 and cfg.trainer.val_freq_epoch == 10


def test_defaults_fill_sections_and_give_typed_blocks_whole(tmp_path):
    """Sections merge key by key (a pil reader gets the default colour order); an optimizer or
    schedule the config gives is kept as given (its kwargs are the torch class's arguments;
    null: no schedule), one without a type is of the default's type, and one left out is the
    default whole."""
    import yaml

    from dualmem.utils.config import load_config, to_plain

    own = {"dataset": {"image_reader": {"type": "pil"}, "train": {"hflip": True}},
           "trainer": {"optimizer": {"kwargs": {"lr": 0.5}}, "lr_scheduler": None}, "net": []}
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(own))
    cfg = to_plain(load_config(tmp_path / "own.yaml", validate=False))
    assert cfg["dataset"]["image_reader"] == {"type": "pil", "kwargs": {"color_mode": "RGB"}}
    assert cfg["dataset"]["train"] == {"hflip": True, "vflip": False, "rotate": False}
    assert cfg["trainer"]["optimizer"] == {"type": "AdamW", "kwargs": {"lr": 0.5}}
    assert cfg["trainer"]["lr_scheduler"] is None
    sgd = load_config(tmp_path / "own.yaml", ["trainer.optimizer={type: SGD, kwargs: {lr: 1}}"],
                      validate=False)
    assert to_plain(sgd.trainer.optimizer) == {"type": "SGD", "kwargs": {"lr": 1}}


def test_the_engine_reads_resolved_settings_without_fallbacks_of_its_own():
    """No setting has a second default in the code: the optimizer, schedule and loss come from
    the resolved config, and colour order and resize from input_settings alone."""
    import re

    from conftest import ROOT

    detector = (ROOT / "utils/detector.py").read_text(encoding="utf-8")
    from_checkpoint = detector[detector.index("def from_checkpoint"):
                               detector.index("def from_dict")]  # (a sidecar's: not a config)
    for path in ("utils/engine/builders.py", "utils/engine/trainer.py", "datasets/builder.py",
                 "utils/detector.py"):
        text = from_checkpoint if path == "utils/detector.py" else \
            (ROOT / path).read_text(encoding="utf-8")
        assert not re.search(r"get\(\"color_mode\"|get\(\"resize\"|resize_method\(", text), path
        assert "FeatureMSELoss" not in text and "1e-4" not in text, path
        assert not re.search(r"or \[?\{\"(type|name)\"", text), path  # a block as fallback
    for path in ("utils/engine/trainer.py", "datasets/builder.py", "utils/detector.py"):
        assert "input_settings(" in (ROOT / path).read_text(encoding="utf-8"), path


def test_unused_uniad_keys_get_a_one_line_warning(tmp_path, capsys):
    from types import SimpleNamespace

    import yaml

    from conftest import ROOT
    from dualmem.utils.run_plan import load_cfg

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "_base_": str(ROOT / "configs" / "runtime.yaml"),
        "saver": {"auto_resume": True}, "port": 11111,
        "trainer": {"tb_freq_step": 5}, "dataset": {"type": "explicit"}, "net": []}))
    load_cfg(SimpleNamespace(config=str(cfg), opts=[]))
    err = capsys.readouterr().err.strip().splitlines()
    warned = [line for line in err if "never read" in line]
    assert len(warned) == 1
    for key in ("port", "saver", "trainer.tb_freq_step"):
        assert key in warned[0]
