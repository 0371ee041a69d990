"""Exit branches on the small CNN with real Fashion-MNIST data (small subsets, CPU)."""
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from calibration import fashion_mnist as fm
from calibration import thresholds as T
from toolkit.exits import (EarlyExitModel, ExitBranch, build_exits, collect_logits, default_weights,
                           exit_flops, load_exits, save_exits, train_exits)
from toolkit.models.small_cnn import SmallCNN, stage_mflops



def _batches(x, y, bs, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)
    return [(x[idx[i:i + bs]], y[idx[i:i + bs]]) for i in range(0, len(x), bs)]


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(2)
    xi, yi = fm.load_fashion_mnist("train")
    xt, yt = fm.load_fashion_mnist("test")
    return (torch.from_numpy(fm.to_input(xi[:3000])), torch.from_numpy(yi[:3000]),
            torch.from_numpy(fm.to_input(xt[:1000])), torch.from_numpy(yt[:1000]))


@pytest.fixture(scope="module")
def trained(data):
    """Backbone 1 epoch on 3000 images, then exits (separate, CE) 1 epoch."""
    x, y, _, _ = data
    torch.manual_seed(0)
    bb = SmallCNN()
    opt = torch.optim.Adam(bb.parameters(), lr=3e-3)
    bb.train()
    for xb, yb in _batches(x, y, 64):
        loss = F.cross_entropy(bb(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bb.eval()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    model = EarlyExitModel(bb, build_exits(bb, ["stage2", "stage1"], x[:2], hidden=64, pool=4))
    cfg = train_exits(model, _batches(x, y, 64, seed=1), mode="separate", loss="ce", epochs=1, lr=3e-3,
                      progress=False)
    return model, before, cfg


def test_unknown_exit_name_lists_valid_paths():
    bb = SmallCNN()
    with pytest.raises(ValueError) as e:
        EarlyExitModel(bb, {"stage_2": ExitBranch(24, 10)})
    msg = str(e.value)
    assert "'stage_2'" in msg and "stage1" in msg and "classifier.0" in msg
    listed = msg.split("closest first): ")[1].split(", ")
    assert listed[0] == "stage2"  # closest first
    with pytest.raises(ValueError, match="valid module paths"):
        build_exits(bb, ["stage9"], torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="NCHW"):  # a cut after flatten is not a feature map
        build_exits(bb, ["pool"], torch.zeros(1, 1, 28, 28))


def test_exits_beat_chance_and_backbone_frozen(trained, data):
    model, before, cfg = trained
    _, _, xt, yt = data
    assert model.exit_names == ["stage1", "stage2"]  # execution order, whatever order was given
    for k, v in model.backbone.state_dict().items():  # separate training must not touch the backbone
        assert torch.equal(v, before[k]), k
    logits = collect_logits(model, xt)
    assert list(logits) == ["stage1", "stage2", "final"]
    acc = {n: float((z.argmax(1) == yt.numpy()).mean()) for n, z in logits.items()}
    assert acc["stage1"] > 0.4 and acc["stage2"] > 0.4 and acc["final"] > 0.6, acc  # chance is 0.1
    assert len(cfg["history"]) == 1 and np.isfinite(cfg["history"][0])
    # calibration on real logits: the delta constraint holds on the profile it was fitted on
    seg = [0.06, 1.35, 5.1]
    prof = T.ExitProfile.from_logits(logits, yt.numpy(), seg, [0.03, 0.05])
    r = T.choose_thresholds_accuracy(prof, delta=0.005)
    assert r["accuracy"] >= acc["final"] - 0.005 - 1e-12


def test_save_load_roundtrip(trained, data, tmp_path):
    model, _, _ = trained
    _, _, xt, _ = data
    save_exits(tmp_path, model, {"mode": "separate", "metrics": {"acc": np.float32(0.5)}})
    meta = json.loads((tmp_path / "exits.json").read_text())
    assert [e["at"] for e in meta["exits"]] == ["stage1", "stage2"] and meta["num_classes"] == 10
    state = torch.load(tmp_path / "exits.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.save(model.backbone.state_dict(), tmp_path / "backbone.pt")
    bb2 = SmallCNN()
    bb2.load_state_dict(torch.load(tmp_path / "backbone.pt", weights_only=True))
    bb2.eval()
    loaded = load_exits(tmp_path, bb2)
    a, b = collect_logits(model, xt[:200]), collect_logits(loaded, xt[:200])
    for n in a:
        np.testing.assert_array_equal(a[n], b[n])


def test_joint_and_distill_modes(data):
    x, y, _, _ = data
    torch.manual_seed(0)
    bb = SmallCNN()
    model = EarlyExitModel(bb, build_exits(bb, ["stage1", "stage2"], x[:2]))
    w0 = bb.stage3[0].weight.clone()
    cfg = train_exits(model, _batches(x[:512], y[:512], 128), mode="joint", epochs=1, progress=False)
    assert cfg["weights"] == pytest.approx([0.2, 0.3, 0.5])
    assert not torch.equal(w0, bb.stage3[0].weight)  # joint training moves the backbone
    # distillation in separate mode needs no labels
    w1 = bb.stage3[0].weight.clone()
    cfg = train_exits(model, [xb for xb, _ in _batches(x[:512], y[:512], 128)], mode="separate",
                      loss="distill", epochs=1, progress=False)
    assert torch.equal(w1, bb.stage3[0].weight) and np.isfinite(cfg["history"][0])
    with pytest.raises(ValueError, match="needs \\(inputs, labels\\)"):
        train_exits(model, [x[:8]], mode="separate", loss="ce", progress=False)
    with pytest.raises(ValueError, match="3 entries"):
        train_exits(model, [], mode="joint", weights=[0.5, 0.5], progress=False)


def test_flops_and_weights():
    br = ExitBranch(16, 10, hidden=64, pool=4)
    # linear 256->64 and 64->10: 2 FLOPs per MAC
    assert exit_flops(br, (16, 14, 14)) == pytest.approx(2 * (256 * 64 + 64 * 10) / 1e6)
    assert exit_flops(br, (8, 16, 14, 14)) == exit_flops(br, (16, 14, 14))
    conv = ExitBranch(24, 10, hidden=0, conv=True, conv_channels=8, kernel=1)
    assert exit_flops(conv, (24, 7, 7)) == pytest.approx(2 * (49 * 24 * 8 + 8 * 10) / 1e6)
    st = stage_mflops(SmallCNN())
    assert st["stage3"] > 0.7 * sum(st.values())  # compute sits late, where exits can skip it
    assert default_weights(4)[-1] == 0.5 and sum(default_weights(4)) == pytest.approx(1.0)
    # hooks stay inert when the backbone is called on its own
    bb = SmallCNN().eval()
    m = EarlyExitModel(bb, build_exits(bb, ["stage1"], torch.zeros(1, 1, 28, 28)))
    with torch.no_grad():
        assert bb(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert m._out == {}
