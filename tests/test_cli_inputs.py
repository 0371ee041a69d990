"""Inputs that conflict with the model or the data get one clear error line (exit code 2) naming what is
wrong and how to fix it, never a traceback and never a silently ignored option."""
from __future__ import annotations

import textwrap

import pytest
import torch
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.graph import TracedModel, TracingError

BRANCHY = textwrap.dedent('''
    import torch
    from torch import nn


    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            if y.mean() > 0:
                return y
            return -y


    class Net(nn.Module):
        def __init__(self, gate_at_root=False):
            super().__init__()
            self.gate_at_root = gate_at_root
            self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.body = nn.Sequential(nn.ReLU(), Gate())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

        def forward(self, x):
            x = self.stem(x)
            if self.gate_at_root and x.max() > 1:
                x = x / 2
            return self.head(self.body(x))


    def build():
        return Net()


    def build_root():
        return Net(gate_at_root=True)
''')


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def branchy(tmp_path):
    path = tmp_path / "branchy.py"
    path.write_text(BRANCHY)
    return path


def test_value_dependent_branch_names_the_module(branchy):
    import importlib.util

    spec = importlib.util.spec_from_file_location("branchy", branchy)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(TracingError, match=r"module 'body\.1' \(Gate\)") as e:
        TracedModel(mod.build(), torch.zeros(1, 3, 32, 32))
    assert f"{branchy}:13 (`if y.mean() > 0:`)" in str(e.value)
    assert "--exits" in str(e.value) and "runtime takes the exit decision" in str(e.value)
    with pytest.raises(TracingError, match=r"the model's own forward \(Net\)"):
        TracedModel(mod.build_root(), torch.zeros(1, 3, 32, 32))
    # the CLI: one line, exit code 2, no traceback, for every command that traces
    for cmd in (["inspect", f"{branchy}:build", "--input-shape", "1,3,32,32"],
                ["export", f"{branchy}:build", "--input-shape", "1,3,32,32", "--preprocess", "none",
                 "--calib", "x.npy", "--split", "stem", "-o", branchy.parent / "b"]):
        if cmd[0] == "export":
            import numpy as np

            np.save(branchy.parent / "x.npy", np.zeros((2, 3, 32, 32), np.float32))
            cmd[cmd.index("x.npy")] = branchy.parent / "x.npy"
        res = run(*cmd)
        assert res.exit_code == 2, res.output
        assert "error: cannot trace module 'body.1' (Gate)" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------- conflicts (issue 12, item 12)
@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from toolkit.onnx_export import export_onnx

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.zeros(1, 3, 8, 8))
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(net, (torch.zeros(1, 3, 8, 8),), path, ["x"], ["y"])
    return path


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    import numpy as np

    path = tmp_path_factory.mktemp("npy") / "small.npy"
    np.save(path, np.zeros((4, 3, 32, 32), np.float32))
    return path


EFF = ["efficientnet-lite0"]
EXPORT = ["export", *EFF, "--split", "blocks.5", "-o", "OUT"]
CONFLICTS = [
    # (arguments, what the one-line refusal must say)
    (["inspect", *EFF, "--preprocess", "fashion-mnist"], "--preprocess fashion-mnist gives 1-channel inputs but the model takes 3"),
    (["inspect", *EFF, "--input-shape", "1,1,28,28"], "its default preprocessing gives 3-channel inputs but the model takes 1"),
    (["inspect", *EFF, "--input-shape", "3,224,224"], "input shape (3, 224, 224) is not (batch, channels, height, width)"),
    (["inspect", "resnet18", "--preprocess", "none", "--input-shape", "1,4,64,64"],
     "ResNet cannot run on an input of shape (1, 4, 64, 64)"),
    (["inspect", "ONNX", "--weights", "w.pt"], "is an ONNX file, which carries its own weights"),
    (["inspect", "ONNX", "--depth", "3"], "--depth: module nesting depth applies to PyTorch models"),
    ([*EXPORT, "--calib-method", "entropy"], "--calib-method: chooses how --int8 quantises the ONNX graphs; add --int8"),
    ([*EXPORT, "--int8", "--int8-weights", "int8", "--format", "tflite"], "--int8-weights: applies to ONNX int8 graphs only"),
    ([*EXPORT, "--calib-method", "entropy", "--int8-weights", "int8"], "--calib-method, --int8-weights: choose how"),
    ([*EXPORT, "--int8-targets", "arm64"], "--int8-targets: chooses how --int8 quantises the ONNX graphs"),
    ([*EXPORT, "--qat"], "--qat: fine-tunes the model for the int8 graphs; add --int8"),
    ([*EXPORT, "--int8-stem"], "--int8-stem: chooses how --int8 quantises the ONNX graphs; add --int8"),
    ([*EXPORT, "--samples", "16", "--verify-samples", "8"], "raise --verify-samples to at least 16"),
    ([*EXPORT, "--samples", "-1"], "-1 is not in the range x>=0"),
    ([*EXPORT, "--calib", "fashion-mnist"], "Fashion-MNIST is read with its own preprocessing"),
    ([*EXPORT, "--preprocess", "none", "--calib", "samples"], "which takes inputs already preprocessed: pass .npy/.npz"),
    ([*EXPORT, "--calib", "samples", "--verify-data", "NPY"], "pass real inputs of that shape with --verify-data"),
    (["eval", "BUNDLE", "--data", "NPY"],  # eval has no --preprocess: the advice says the bundle keeps its own
     ("samples have shape (3, 32, 32), the model expects (3, 224, 224)", "a bundle keeps those it was exported with")),
    (["eval", "BUNDLE", "--data", "fashion-mnist"],
     ("Fashion-MNIST is read with its own preprocessing", "a bundle keeps the preprocessing it was exported with")),
    (["exits", "calibrate", "BUNDLE", "--data", "samples"], "the bundle has no exit branches to calibrate"),
    (["exits", "calibrate", "BUNDLE", "--bandwidth", "5mbit", "--rtt", "20ms"],
     "--bandwidth, --rtt: describe the latency objective, which --board DEVICE_BOARD selects"),
    (["exits", "train", "fashion-cnn", "--exits", "stage1", "--weights-per-exit", "0.5,0.5", "-o", "OUT"],
     "--weights-per-exit: loss weights combine the exits' losses in --mode joint"),
    (["exits", "train", "fashion-cnn", "--exits", "stage1", "--mode", "joint", "--weights-per-exit", "0.5,0.2,0.3",
      "-o", "OUT"], "joint training needs 2 non-negative ones"),
    (["exits", "predictor", "train", "BUNDLE", "--weights", "w.pt", "--preprocess", "none"],
     "--weights, --preprocess: apply to a MODEL; a bundle carries its own graphs"),
    (["exits", "predictor", "train", "/nonexistent"], "unknown MODEL '/nonexistent'"),  # before asking for --exits
    (["exits", "predictor", "train", "fashion-cnn", "--pair", "onnx/int8"],
     "--pair: applies to a bundle TARGET (its graphs); drop it for a MODEL"),
    ([*EXPORT, "--bottleneck", "DIR", "--exits", "DIR"], "--exits: exit branches are not exported with a bottleneck"),
    ([*EXPORT, "--wire-step", "4", "--wire-budget", "5000"], "--wire-step, --wire-budget: set the quantiser step two"),
    ([*EXPORT, "--wire-budget", "5000", "--wire-range", "mse"], "--wire-range: --wire-budget chooses the range (one step"),
    ([*EXPORT, "--wire-step", "0"], "--wire-step: the quantiser step must be a finite number > 0"),
    ([*EXPORT, "--wire-step", "inf"], "--wire-step: the quantiser step must be a finite number > 0, got inf"),
    ([*EXPORT, "--wire-budget", "5000", "--wire-codec", "none"], "a byte budget needs an entropy coder"),
    (["export", "resnet18", "--split", "layer3.0.conv1", "--wire-budget", "15000", "-o", "OUT"],
     "--wire-budget: bounds the frame of a single split tensor, and 2 tensors cross 'layer3.0.conv1'"),
    ([*EXPORT, "--wire-transform", "klt", "--exits", "DIR"], "--exits: exit branches are not exported with --wire-trans"),
    ([*EXPORT, "--wire-transform", "klt", "--split", "pool.1"], "not an NCHW feature map; the KLT rotates the channels of one"),
    ([*EXPORT, "--wire-transform", "klt", "--bottleneck", "DIR"], "--bottleneck: a bottleneck already reshapes"),
    (["export", "ONNX", "--split", "x", "--wire-transform", "klt", "-o", "OUT"],
     "--wire-transform: the transform is baked into PyTorch graphs"),
    ([*EXPORT, "--bottleneck", "DIR", "--int8", "--qat"], "--qat: fine-tunes the original model, not the model with"),
    (["export", "ONNX", "--split", "x", "--bottleneck", "DIR", "-o", "OUT"],
     "--bottleneck: a bottleneck is inserted into the PyTorch model it was trained on"),
    (["bottleneck", "train", *EFF, "--split", "blocks.3", "--channels", "8", "--bits", "1", "-o", "OUT"],
     "1 is not in the range 2<=x<=8"),
    (["bottleneck", "train", *EFF, "--split", "blocks.3", "--channels", "8", "--kd-temperature", "2", "-o", "OUT"],
     "--kd-temperature sets how the logits are matched: add --match logits"),
    (["bottleneck", "eval", "BUNDLE"], "the bundle has no bottleneck (export it with --bottleneck DIR)"),
    (["plan", *EFF, "--plot", "a.png", "--no-plot"], "--plot: --no-plot writes no plot"),
    (["plan", *EFF, "--export-onnx", "OUT.onnx", "--bandwidth", "5mbit", "--json"],
     "--bandwidth, --json: --export-onnx only writes the model"),
    (["plan", *EFF, "--board", "rpi4", "--server-profile", "rpi5", "--runs", "5"],
     "--runs: sets this host's latency measurement, and this plan measures nothing here"),
]


@pytest.mark.parametrize("args,message", CONFLICTS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CONFLICTS])
def test_conflicting_option_is_refused_with_the_reason(args, message, tmp_path, tiny_onnx, arrays, effnet_bundle):
    subst = {"ONNX": tiny_onnx, "NPY": arrays, "BUNDLE": effnet_bundle[0], "OUT": tmp_path / "out", "DIR": tmp_path,
             "OUT.onnx": tmp_path / "out.onnx"}
    res = run(*[subst.get(a, a) for a in args])
    assert res.exit_code == 2, res.output
    for part in (message,) if isinstance(message, str) else message:
        assert part in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_input_shape_sets_the_image_crop(tmp_path):
    from calibration.readers import read_dataset
    from toolkit.sources import resolve

    src = resolve("efficientnet-lite0", input_shape="1,3,320,320")
    assert src.preprocess["crop"] == [320, 320] and src.preprocess["resize_shorter"] == 366
    ds = read_dataset("samples", src.preprocess, limit=2)
    assert ds.x.shape == (2, 3, 320, 320)
    assert resolve("efficientnet-lite0").preprocess["crop"] == [224, 224]


def test_fashion_model_reads_its_own_png_samples(tmp_path):
    """A Fashion-MNIST bundle's samples/ are 28x28 PNGs; they are valid --data for the model that wrote them."""
    import numpy as np
    from PIL import Image

    from calibration.fashion_mnist import PREPROCESS
    from calibration.readers import read_dataset

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"s{i}.png")
    ds = read_dataset(str(tmp_path), PREPROCESS)
    want = (pixels[:, None].astype(np.float32) / 255.0 - PREPROCESS["mean"][0]) / PREPROCESS["std"][0]
    assert ds.x.shape == (3, 1, 28, 28)
    np.testing.assert_allclose(ds.x, want, atol=1e-6)


def test_export_never_deletes_a_folder_that_is_not_a_bundle(tmp_path, monkeypatch):
    """-o replaces an old bundle, but a non-empty folder that is no bundle, the current folder, or a folder
    holding the inputs is refused before any work, and every file in it survives."""
    keep = tmp_path / "thesis"
    (keep / "sub").mkdir(parents=True)
    (keep / "notes.txt").write_text("mine")
    (keep / "sub" / "y.txt").write_text("mine too")
    r = run("export", "fashion-cnn", "--split", "stage2", "-o", keep)
    assert r.exit_code == 2 and "not empty and holds no eetool bundle" in r.output
    assert (keep / "notes.txt").read_text() == "mine" and (keep / "sub" / "y.txt").is_file()

    monkeypatch.chdir(keep)
    r = run("export", "fashion-cnn", "--split", "stage2", "-o", ".")
    assert r.exit_code == 2 and "current folder" in r.output
    assert (keep / "notes.txt").is_file()

    monkeypatch.chdir(tmp_path.parent)
    data = tmp_path / "photos"
    data.mkdir()
    (data / "manifest.json").write_text("{}")  # even a bundle-looking folder is kept when it holds the data
    (data / "graphs").mkdir()
    for out in (tmp_path, data):
        r = run("export", "fashion-cnn", "--split", "stage2", "--calib", data, "-o", out)
        assert r.exit_code == 2 and "holds the input" in r.output
    assert (data / "manifest.json").is_file()


def test_a_value_the_library_refuses_is_one_error_line_and_debug_keeps_the_traceback(tmp_path, monkeypatch):
    """ValueErrors raised below the CLI (here: an exit point that does not exist) give 'error: ...' and exit
    code 2; EETOOL_DEBUG=1 lets the exception through for a bug report."""
    from toolkit.models.small_cnn import SmallCNN

    weights = tmp_path / "backbone.pt"
    torch.save(SmallCNN().state_dict(), weights)
    args = ("exits", "train", "fashion-cnn", "--weights", weights, "--exits", "stage9", "--data", "fashion-mnist:train",
            "--limit", "64", "-o", tmp_path / "exits")
    r = run(*args)
    assert r.exit_code == 2 and "unknown exit point 'stage9'" in r.output and "stage2" in r.output
    assert "Traceback" not in r.output
    monkeypatch.setenv("EETOOL_DEBUG", "1")
    r = run(*args)
    assert isinstance(r.exception, ValueError) and "stage9" in str(r.exception)


def test_a_bad_split_name_is_refused_before_any_data_is_read(tmp_path):
    """The split names are checked on the traced model first: with a missing --calib folder too, the error
    is the split's (with the nearest valid names), not the data's."""
    from toolkit.models.small_cnn import SmallCNN

    torch.save(SmallCNN().state_dict(), tmp_path / "backbone.pt")
    r = run("export", "fashion-cnn", "--weights", tmp_path / "backbone.pt", "--split", "stage9",
            "--calib", tmp_path / "missing", "-o", tmp_path / "b")
    assert r.exit_code == 2 and "unknown split point 'stage9'" in r.output and "stage2" in r.output


def test_a_step_the_data_refutes_is_refused_and_leaves_no_half_written_bundle(tmp_path):
    """The step is checked against the representative features, so after the float graphs were written:
    the refusal must still be one line that names the option, and the folder must be gone."""
    out = tmp_path / "b"
    res = run("export", "efficientnet-lite0", "--split", "blocks.5", "--format", "onnx", "--calib", "samples",
              "--calib-samples", "4", "--verify-samples", "4", "--samples", "0", "--no-profile-graph",
              "--wire-step", "0.0001", "-o", out)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "--wire-step 0.0001 is finer than 8-bit codes can cover" in text and "give a step of at least" in text
    assert "Traceback" not in res.output and not out.exists()
