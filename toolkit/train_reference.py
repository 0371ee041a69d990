"""Train the Fashion-MNIST early-exit reference model end to end.

``python -m toolkit.train_reference --out DIR`` (CPU, 2 threads, seeded):

1. attaches exits after ``stage1`` and ``stage2`` to :class:`toolkit.models.small_cnn.SmallCNN` and trains
   backbone and exits together on the Fashion-MNIST train set minus its last ``--val`` samples (default:
   joint, 4 epochs, Adam with a one-cycle LR, each exit's loss half cross-entropy, half distillation from
   the final output); ``--mode separate`` trains the backbone first (``--epochs``), then the exits on the
   frozen backbone (``--exit-epochs``);
3. calibrates thresholds on the held-out validation split (last ``--val`` train samples) for an
   accuracy drop <= ``--delta`` vs the final exit, both rules;
4. evaluates on the TEST set and writes ``DIR/backbone.pt`` (state dict), ``DIR/exits.pt`` +
   ``exits.json``, ``DIR/calibration.json`` and ``DIR/curve.png``.

Joint training is the default because it gave both the stronger backbone and the stronger exits here
(test set, same initialisation, final / stage1 / stage2 top-1: separate with 3 backbone + 2 exit epochs
90.85 / 82.3 / 86.1 %; joint, 3 epochs, cross-entropy 91.38 / 83.7 / 87.9 %; joint, 4 epochs,
self-distillation 0.5: 91.58 / 84.0 / 88.2 %). With ``--mode separate``,
``--compare-joint`` additionally trains backbone + exits jointly from the same initialisation for the same
number of epochs and reports both (Scardapane et al. 2020, joint vs separate/frozen training).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from calibration import thresholds as T
from calibration.fashion_mnist import PREPROCESS, load_fashion_mnist, to_input
from toolkit.exits import (json_default, EarlyExitModel, build_exits, collect_logits, cut_shapes, exit_flops,
                           save_exits, train_exits)
from toolkit.models.small_cnn import STAGES, SmallCNN, stage_mflops

EXIT_POINTS = ["stage1", "stage2"]
EXIT_OPTS = {"hidden": 64, "pool": 4}  # coarse 4x4 spatial pooling: far better than GAP, few FLOPs


class Batches:
    """Re-iterable minibatches over in-memory tensors; reshuffled each pass from a seeded generator."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0):
        self.x, self.y, self.bs, self.shuffle = x, y, batch_size, shuffle
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self):
        return (len(self.x) + self.bs - 1) // self.bs

    def __iter__(self):
        idx = torch.randperm(len(self.x), generator=self.gen) if self.shuffle else torch.arange(len(self.x))
        for i in range(0, len(idx), self.bs):
            j = idx[i:i + self.bs]
            yield self.x[j], self.y[j]


def _one_cycle(model: nn.Module, loader: Batches, epochs: int, lr: float, loss_fn, desc: str,
               progress: bool) -> list[float]:
    """Adam + one-cycle LR over ``epochs``; ``loss_fn(model, x, y)`` gives the batch loss. Returns the mean
    loss per epoch and leaves ``model`` in eval mode."""
    from runtime.progress import progress as bar

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    hist = []
    for ep in range(epochs):
        model.train()
        tot, n = 0.0, 0
        it = bar(loader, f"{desc} epoch {ep + 1}/{epochs}", "batch", enabled=progress)
        for x, y in it:
            loss = loss_fn(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(x)
            n += len(x)
            it.set_postfix(loss=f"{tot / n:.4f}")
        hist.append(tot / n)
    model.eval()
    return hist


def train_backbone(model: nn.Module, loader: Batches, epochs: int, lr: float, progress: bool = True) -> list[float]:
    """Adam + one-cycle LR, cross-entropy. Returns mean loss per epoch."""
    return _one_cycle(model, loader, epochs, lr, lambda m, x, y: F.cross_entropy(m(x), y), "backbone", progress)


def train_joint(model: EarlyExitModel, loader: Batches, epochs: int, lr: float, progress: bool = True,
                self_distill: float = 0.0, temperature: float = 2.0) -> dict:
    """Joint training (weighted sum of every exit's and the final output's cross-entropy) with the same
    one-cycle schedule as the backbone; :func:`toolkit.exits.train_exits` keeps a constant LR, which
    matters little for exits on a trained backbone but does for training from scratch.

    ``self_distill`` (0..1): each early exit's loss becomes ``(1 - a) * CE(exit, y) + a * KD(exit, final)``
    with the final output (detached) as teacher at ``temperature`` (Hinton et al. 2015; self-distillation
    as in Zhang et al., "Be Your Own Teacher", ICCV 2019): exits that agree with the final classifier lose
    less accuracy when they stop a sample."""
    from toolkit.exits import _distill, default_weights

    w = default_weights(len(model.exit_names) + 1)
    if not 0.0 <= self_distill <= 1.0:
        raise ValueError(f"self_distill must be in [0, 1], got {self_distill}")

    def loss(m, x, y):
        outs = list(m(x).values())
        final = outs[-1]
        terms = [(1 - self_distill) * F.cross_entropy(o, y) + self_distill * _distill(o, final, temperature)
                 if self_distill else F.cross_entropy(o, y) for o in outs[:-1]]
        return sum(wk * t for wk, t in zip(w, terms + [F.cross_entropy(final, y)]))

    hist = _one_cycle(model, loader, epochs, lr, loss, "joint", progress)
    return {"mode": "joint", "loss": "ce" if not self_distill else f"ce + self-distillation {self_distill:g}",
            "epochs": epochs, "lr": lr, "weights": w, "history": hist, "schedule": "one-cycle",
            "self_distill": self_distill, "temperature": temperature if self_distill else None}


def costs(model: EarlyExitModel) -> tuple[list[float], list[float]]:
    """(segment MFLOPs per output, branch MFLOPs per early exit) for one 1x28x28 sample."""
    st = stage_mflops(model.backbone)
    seg, acc, names = [], 0.0, iter(STAGES)
    for cut in model.exit_names:
        for s in names:
            acc += st[s]
            if s == cut:
                break
        seg.append(acc)
        acc = 0.0
    seg.append(sum(st[s] for s in names))
    shapes = cut_shapes(model.backbone, model.exit_names, torch.zeros(1, 1, 28, 28))
    br = [exit_flops(b, shapes[n]) for n, b in model.exits.items()]
    return seg, br


def evaluate(model: EarlyExitModel, xv, yv, xt, yt, delta: float) -> dict:
    """Calibrate on validation, evaluate on test, for both rules."""
    seg, br = costs(model)
    prof_v = T.ExitProfile.from_logits(collect_logits(model, xv), yv.numpy(), seg, br)
    prof_t = T.ExitProfile.from_logits(collect_logits(model, xt), yt.numpy(), seg, br)
    res = {"names": prof_t.names, "segment_mflops": seg, "branch_mflops": br,
           "backbone_mflops": prof_t.backbone_mflops,
           "val_accuracy": prof_v.accuracy(), "test_accuracy": prof_t.accuracy(), "rules": {}}
    for rule in T.RULES:
        chosen = T.choose_thresholds_accuracy(prof_v, delta=delta, rule=rule)
        test = T.simulate(prof_t, chosen["thresholds"], rule)
        res["rules"][rule] = {"thresholds": chosen["thresholds"], "val": chosen, "test": test,
                              "test_drop": prof_t.accuracy()["final"] - test["accuracy"],
                              "curve_val": T.curve(prof_v, rule), "curve_test": T.curve(prof_t, rule)}
    return res


def summary(title: str, res: dict) -> str:
    lines = [f"== {title}", f"backbone MFLOPs/sample {res['backbone_mflops']:.3f}  "
             f"(segments {', '.join(f'{v:.3f}' for v in res['segment_mflops'])}; "
             f"exit branches {', '.join(f'{v:.4f}' for v in res['branch_mflops'])})",
             "test accuracy of every output on all samples: " +
             ", ".join(f"{n} {100 * a:.2f}%" for n, a in res["test_accuracy"].items())]
    hdr = f"{'rule':<19}{'thresholds':<22}{'test acc':>9}{'drop pt':>8}{'MFLOPs':>8}{'ratio':>7}  exit rates (acc of exited)"
    lines.append(hdr)
    for rule, r in res["rules"].items():
        t = r["test"]
        th = ", ".join("off" if v is None else f"{v:.4f}" for v in r["thresholds"])
        rates = "  ".join(f"{n} {100 * p:.1f}%" + (f" ({100 * a:.1f}%)" if a is not None else "")
                          for n, p, a in zip(res["names"], t["exit_rates"], t["exit_accuracy"]))
        lines.append(f"{rule:<19}{th:<22}{100 * t['accuracy']:>8.2f}%{100 * r['test_drop']:>8.2f}"
                     f"{t['expected_mflops']:>8.3f}{t['mflops_ratio']:>7.3f}  {rates}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=4, help="backbone epochs (joint mode: backbone and exits)")
    ap.add_argument("--exit-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3, help="backbone peak LR (one-cycle)")
    ap.add_argument("--exit-lr", type=float, default=2e-3)
    ap.add_argument("--mode", choices=["separate", "joint"], default="joint")
    ap.add_argument("--self-distill", type=float, default=0.5,
                    help="joint mode: weight of distillation from the final output in each exit's loss (0..1)")
    ap.add_argument("--loss", choices=["ce", "distill"], default="ce")
    ap.add_argument("--val", type=int, default=5000, help="last N train samples held out for calibration")
    ap.add_argument("--delta", type=float, default=0.005, help="allowed accuracy drop vs final exit")
    ap.add_argument("--rule", choices=list(T.RULES), default="max_softmax", help="rule written as primary")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=0, help="use only the first N train samples (debug)")
    ap.add_argument("--compare-joint", action="store_true", help="also train jointly and report both")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.time()
    prog = not a.no_progress
    xi, yi = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    x_all, y_all = torch.from_numpy(to_input(xi)), torch.from_numpy(yi)
    xtr, ytr = x_all[:-a.val], y_all[:-a.val]
    if a.train_limit:
        xtr, ytr = xtr[:a.train_limit], ytr[:a.train_limit]
    xv, yv = x_all[-a.val:], y_all[-a.val:]
    xt, yt = torch.from_numpy(to_input(xte)), torch.from_numpy(yte)

    backbone = SmallCNN()
    init_state = copy.deepcopy(backbone.state_dict())
    timings = {}
    t = time.time()
    exits_torch_seed = a.seed + 1
    if a.mode == "separate":
        bb_hist = train_backbone(backbone, Batches(xtr, ytr, a.batch_size, seed=a.seed), a.epochs, a.lr, prog)
        timings["backbone_s"] = time.time() - t
        torch.manual_seed(exits_torch_seed)
        model = EarlyExitModel(backbone, build_exits(backbone, EXIT_POINTS, xtr[:2], **EXIT_OPTS))
        t = time.time()
        train_cfg = train_exits(model, Batches(xtr, ytr, a.batch_size, seed=a.seed + 1), mode="separate",
                                loss=a.loss, epochs=a.exit_epochs, lr=a.exit_lr, progress=prog)
        timings["exits_s"] = time.time() - t
    else:
        bb_hist = None
        torch.manual_seed(exits_torch_seed)
        model = EarlyExitModel(backbone, build_exits(backbone, EXIT_POINTS, xtr[:2], **EXIT_OPTS))
        train_cfg = train_joint(model, Batches(xtr, ytr, a.batch_size, seed=a.seed), a.epochs, a.lr, prog,
                                self_distill=a.self_distill)
        timings["joint_s"] = time.time() - t
    train_cfg["backbone_history"] = bb_hist
    t = time.time()
    res = evaluate(model, xv, yv, xt, yt, a.delta)
    timings["calibrate_eval_s"] = time.time() - t
    text = summary(f"{a.mode} ({a.loss})", res)

    joint = None
    if a.compare_joint and a.mode == "separate":
        t = time.time()
        jb = SmallCNN()
        jb.load_state_dict(init_state)  # same initialisation as the separate run's backbone
        torch.manual_seed(exits_torch_seed)
        jm = EarlyExitModel(jb, build_exits(jb, EXIT_POINTS, xtr[:2], **EXIT_OPTS))
        jcfg = train_joint(jm, Batches(xtr, ytr, a.batch_size, seed=a.seed), a.epochs, a.lr, prog)
        jres = evaluate(jm, xv, yv, xt, yt, a.delta)
        timings["joint_s"] = time.time() - t
        joint = {"training": jcfg, "results": _strip_curves(jres)}
        text += "\n" + summary("joint (ce), same init and epochs", jres)

    a.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.backbone.state_dict(), a.out / "backbone.pt")
    primary = res["rules"][a.rule]
    metrics = {"test_accuracy": res["test_accuracy"], "val_accuracy": res["val_accuracy"],
               "mflops": [*res["branch_mflops"]]}
    save_exits(a.out, model, {**train_cfg, "backbone": {"class": "toolkit.models.small_cnn.SmallCNN",
                                                         "config": backbone.config},
                              "exit_opts": EXIT_OPTS, "metrics": metrics})
    timings["total_s"] = time.time() - t0
    calib = {
        "schema": "eetool.calibration/1", "dataset": "fashion-mnist (Debian dataset-fashion-mnist)",
        "preprocess": PREPROCESS, "validation": f"train[-{a.val}:]", "test": "t10k (10000)",
        "delta": a.delta, "primary_rule": a.rule, "thresholds": primary["thresholds"],
        "exits": [{"name": f"exit{i}", "at": n, "mflops": res["branch_mflops"][i],
                   "threshold": primary["thresholds"][i], "rule": a.rule}
                  for i, n in enumerate(EXIT_POINTS)],
        "backbone_accuracy": res["test_accuracy"]["final"], "results": res, "joint": joint,
        "timings_s": timings, "seed": a.seed, "args": {k: str(v) for k, v in vars(a).items()},
    }
    (a.out / "calibration.json").write_text(json.dumps(calib, indent=1, default=_json) + "\n")
    T.plot_curve([r["curve_test"] for r in res["rules"].values()], a.out / "curve.png",
                 chosen=[{**r["test"], "rule": k} for k, r in res["rules"].items()],
                 title="Fashion-MNIST small CNN, early exits (test set)")
    print(text)
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"wrote {a.out}/backbone.pt exits.pt exits.json calibration.json curve.png")
    return calib


def _strip_curves(res: dict) -> dict:
    out = dict(res)
    out["rules"] = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("curve")} for k, v in res["rules"].items()}
    return out


def _json(o):
    return str(o) if isinstance(o, Path) else json_default(o)


if __name__ == "__main__":
    main()
