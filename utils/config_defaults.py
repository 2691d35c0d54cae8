"""One source of defaults: the value of every engine setting a config may leave out.

``load_config`` fills these in (a config's own value always wins), so the code reads settings
without fallbacks of its own, and the resolved ``config.yaml`` of a run shows every value it
used. ``configs/runtime.yaml`` shows the same values (a test keeps the two equal).
"""

DEFAULTS = {
    "random_seed": 133,
    "deterministic": False,
    "dataset": {
        "batch_size": 8,
        "workers": 2,
        "validate": True,
        "on_bad_file": "error",
        "check_files": True,
    },
    "trainer": {
        "max_epoch": 1000,
        "clip_max_norm": 0.1,
        "val_freq_epoch": 10,
        "print_freq_step": 10,
        "amp": False,
        "on_nonfinite": "stop",
        "max_nonfinite_steps": 20,
        "feature_cache": "auto",
        "feature_cache_dtype": "float32",
        "feature_cache_dir": None,
        "channels_last": False,
        "compile": False,
        "find_unused_parameters": False,
    },
}

# UniAD keys accepted so its configs load, but nothing here reads them
UNUSED_UNIAD_KEYS = ("port", "saver", "trainer.tb_freq_step", "evaluator.save_dir",
                     "evaluator.vis_compound", "evaluator.vis_single", "evaluator.eval_dir")


def apply_defaults(tree, defaults=DEFAULTS):
    """Fill the keys ``tree`` leaves out (in place; nested dicts merged)."""
    for key, value in defaults.items():
        if isinstance(value, dict):
            if not isinstance(tree.get(key), dict):
                if tree.get(key) is not None:
                    continue  # a wrong type: validation names it
                tree[key] = {}
            apply_defaults(tree[key], value)
        elif key not in tree:
            tree[key] = value
    return tree


def unused_keys(tree):
    """The UniAD keys present in ``tree`` that nothing reads (for a one-line warning)."""
    found = []
    for dotted in UNUSED_UNIAD_KEYS:
        node = tree
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if node is not None:
            found.append(dotted)
    return found
