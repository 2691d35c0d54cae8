"""Property-based: whatever overrides or manifest lines are thrown at the loaders, they are
accepted and round-trip, or rejected with a clear error of the documented type."""
import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from dualmem.datasets.manifest import read_manifest, write_manifest
from dualmem.utils.config import ConfigError, load_config, save_config

DEMO = ROOT / "experiments" / "demo" / "config.yaml"
KEYS = ["trainer.max_epoch", "trainer.clip_max_norm", "trainer.amp", "dataset.batch_size",
        "dataset.input_size", "dataset.input_size.0", "net.0.kwargs.pretrained",
        "net.2.kwargs.hidden_dim", "net.1.prev", "net.5.type", "evaluator.image_score.reduction",
        "trainer.optimizer.kwargs.lr", "random_seed", "trainer.max_epochs", "dataset",
        "net.x", "evaluator.metrics", "dataset.image_reader.kwargs.color_mode"]
scalars = st.one_of(st.integers(-5, 300), st.floats(allow_nan=False, width=32), st.booleans(),
                    st.text(string.ascii_letters + "[]{},: .-_0123456789", max_size=12),
                    st.none())
values = st.one_of(scalars, st.lists(scalars, max_size=3))


def yaml_text(value):
    return json.dumps(value) if not isinstance(value, str) else value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=3), st.data())
def test_overrides_accept_and_round_trip_or_raise_config_error(pairs, data):
    opts = [f"{key}={yaml_text(value)}" for key, value in pairs]
    try:
        cfg = load_config(DEMO, opts)
    except ConfigError as exc:
        assert str(exc)  # a message, never another exception type
        return
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "config.yaml"
        save_config(cfg, saved)
        again = load_config(saved)
    again.pop("config_path")
    original = dict(cfg)
    original.pop("config_path")
    assert again == original


line_values = st.one_of(st.integers(-2, 3), st.booleans(), st.text(max_size=8), st.none(),
                        st.floats(allow_nan=False))
records = st.dictionaries(st.sampled_from(["filename", "label", "clsname", "maskname",
                                           "label_name", "extra"]), line_values, max_size=6)
lines = st.one_of(records.map(json.dumps), st.text(max_size=30))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(lines, min_size=1, max_size=5))
def test_manifest_lines_accept_and_round_trip_or_name_the_line(tmp_path, text_lines):
    path = tmp_path / "m.json"
    path.write_text("\n".join(text_lines) + "\n", encoding="utf-8")
    try:
        recs = read_manifest(path)
    except ValueError as exc:
        assert str(path) in str(exc) and "line" in str(exc)
        return
    out = tmp_path / "out.json"
    write_manifest(out, recs)
    assert read_manifest(out) == recs
