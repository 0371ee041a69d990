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
