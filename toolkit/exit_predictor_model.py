"""Train the Exit Predictor on a PyTorch model with trained exits (before export): features from a forward
hook, labels from the exits' confidences under their thresholds (:mod:`toolkit.exit_predictor`). The result
is saved beside the exits, and ``eetool export --exits DIR`` exports it into the bundle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from calibration.readers import Dataset
from runtime.confidence import confidence

from . import exit_predictor as EP
from .exits import check_names, load_exits


def calibrated_thresholds(exits_dir, names: list[str]) -> tuple[list[float | None], str]:
    """Thresholds and rule of the exits (in ``names`` order of attach points) from ``calibration.json``;
    ValueError saying how to get them when it is missing."""
    f = Path(exits_dir) / "calibration.json"
    if not f.is_file():
        raise ValueError(f"{exits_dir}: no calibration.json with the exits' thresholds; give --label-thresholds, "
                         f"or train on the exported bundle after 'eetool exits calibrate'")
    by_at = {e["at"]: e for e in json.loads(f.read_text()).get("exits", [])}
    missing = [n for n in names if n not in by_at]
    if missing:
        raise ValueError(f"{f}: no threshold for exits at {missing}")
    rules = {by_at[n].get("rule", "max_softmax") for n in names}
    if len(rules) != 1:
        raise ValueError(f"{f}: exits use different rules {sorted(rules)}")
    return [by_at[n].get("threshold") for n in names], rules.pop()


@torch.no_grad()
def _features(model, ee, x: np.ndarray, at: str, batch: int = 512) -> tuple[np.ndarray, dict]:
    seen = {}
    hook = None
    if at != "input":
        hook = model.get_submodule(at).register_forward_hook(lambda _m, _i, o: seen.__setitem__("f", o))
    feats, logits = [], {}
    try:
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))
            out = ee(xb)
            feats.append((xb if at == "input" else seen["f"]).numpy().copy())
            for k, v in out.items():
                logits.setdefault(k, []).append(v.numpy())
    finally:
        if hook is not None:
            hook.remove()
    return np.concatenate(feats), {k: np.concatenate(v) for k, v in logits.items()}


def train_on_model(model: torch.nn.Module, exits_dir, data: Dataset, at: str | None = None,
                   thresholds: list[float | None] | None = None, holdout: float = 0.1, epochs: int = 8,
                   lr: float = 3e-3, seed: int = 0, **arch) -> tuple[EP.ExitPredictor, dict]:
    """Train the predictor on ``model`` with the exits in ``exits_dir``: it reads ``at`` ('input' or a
    module path no later than the first exit; default: the first exit's attach point). Returns ``(model,
    report)`` like :func:`toolkit.exit_predictor_bundle.train_on_bundle` (without the cost effect, which
    needs the exported graphs' MFLOPs: see ``eetool exits calibrate`` after export)."""
    ee = load_exits(exits_dir, model)
    cuts = list(ee.exit_names)
    at = at or cuts[0]
    if at != "input":
        order = check_names(model, [at, cuts[0]]) if at != cuts[0] else [at]
        if order[0] != at:
            raise ValueError(f"the predictor must read a tensor before the first exit ({cuts[0]!r}); {at!r} comes after")
    meta = json.loads((Path(exits_dir) / "exits.json").read_text())
    names = [e["name"] for e in meta["exits"]]
    if thresholds is None:
        thresholds, rule = calibrated_thresholds(exits_dir, cuts)
    else:
        rule = "max_softmax"
        if len(thresholds) != len(cuts):
            raise ValueError(f"{len(thresholds)} label thresholds for {len(cuts)} exits")
    feats, logits = _features(model, ee, data.x, at)
    conf = np.stack([confidence(logits[c], rule) for c in cuts])
    labels = EP.exit_labels(conf, thresholds, rule)
    n_val = max(1, int(round(len(data) * holdout))) if holdout > 0 else 0
    pred, training = EP.train_predictor(feats[: len(data) - n_val], labels[: len(data) - n_val], epochs=epochs,
                                        lr=lr, seed=seed, **arch)
    report = {"input": at, "exits": names, "rule": rule, "label_thresholds": list(thresholds),
              "mflops": EP.predictor_mflops(pred, feats.shape[1:]),
              "training": {**training, "samples": len(data) - n_val, "source": data.source}}
    if n_val:
        report["holdout"] = {"samples": n_val, **EP.metrics(EP.predict(pred, feats[-n_val:]), labels[-n_val:], 0.5)}
    return pred, report
