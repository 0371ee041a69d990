"""runtime.boards and boards/*.json."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from runtime import boards as B

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["host", "jetson-agx-orin", "jetson-nano", "jetson-orin-nano", "rpi3", "rpi4", "rpi5"]


def test_all_profiles_present_and_valid():
    assert B.default_boards_dir() == os.path.join(REPO, "boards")
    assert B.list_boards() == NAMES
    for name in NAMES:
        p = B.load_board(name)
        assert p["name"] == name
        for key in B.SOURCED_FIELDS:
            assert p["sources"][key]


@pytest.mark.parametrize("name,model,cores,sensor,backend", [
    ("rpi3", "Cortex-A53", 4, "none", "litert"),
    ("rpi4", "Cortex-A72", 4, "none", "litert"),
    ("rpi5", "Cortex-A76", 4, "pmic", "litert"),
    ("jetson-nano", "Cortex-A57", 4, "ina3221", "onnxruntime"),
    ("jetson-orin-nano", "Cortex-A78AE", 6, "ina3221", "onnxruntime"),
    ("jetson-agx-orin", "Cortex-A78AE", 12, "ina3221", "onnxruntime"),
    ("host", None, None, "rapl", "onnxruntime"),
])
def test_profile_contents(name, model, cores, sensor, backend):
    p = B.load_board(name)
    if model:
        assert p["cpu"]["model"] == model
    assert p["cpu"]["cores"] == cores
    assert p["energy_sensor"] == sensor and p["backend"]["preferred"] == backend
    assert 0 < p["power"]["idle_w"] < p["power"]["active_w"]


def test_clock_figures():
    assert B.load_board("rpi3")["cpu"]["clock_mhz"] == 1200
    assert B.load_board("rpi4")["cpu"]["clock_mhz"] in (1500, 1800)
    assert B.load_board("rpi5")["cpu"]["clock_mhz"] == 2400


def test_estimates_are_labelled_as_such():
    # the compute throughput is a rough figure on every board: its source must say so
    for name in NAMES:
        assert "estimate" in B.load_board(name)["sources"]["compute"].lower()


def test_unknown_name_lists_valid_names():
    with pytest.raises(B.BoardError) as ei:
        B.load_board("rpi9")
    msg = str(ei.value)
    for name in NAMES:
        assert name in msg


def test_load_by_path_and_validation_errors(tmp_path):
    good = B.load_board("rpi4")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(dict(good, name="mine")))
    assert B.load_board(str(path))["name"] == "mine"
    bad = dict(good)
    bad["energy_sensor"] = "thermometer"
    bad["sources"] = {"cpu": "x"}
    bad["power"] = {"idle_w": 9, "active_w": 3}
    del bad["python"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(B.BoardError) as ei:
        B.load_board(str(tmp_path / "bad.json"))
    msg = str(ei.value)
    assert "energy_sensor" in msg and "sources lacks" in msg and "idle_w <= active_w" in msg and "python" in msg
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(B.BoardError, match="cannot read"):
        B.load_board(str(tmp_path / "broken.json"))
    # a name whose file says another name
    (tmp_path / "other.json").write_text(json.dumps(good))
    with pytest.raises(B.BoardError, match="does not match"):
        B.load_board("other", boards_dir=str(tmp_path))


def test_boards_found_from_a_copied_bundle(tmp_path):
    """In an exported bundle runtime/ and boards/ sit side by side: lookup must work there too."""
    bundle = tmp_path / "bundle"
    shutil.copytree(os.path.join(REPO, "runtime"), str(bundle / "runtime"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(REPO, "boards"), str(bundle / "boards"))
    code = ("import runtime.boards as b, json; p = b.load_board('rpi5'); "
            "print(json.dumps([b.default_boards_dir(), p['name']]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(bundle), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=60, env=dict(os.environ, PYTHONPATH=str(bundle)))
    assert out.returncode == 0, out.stderr.decode()
    d, name = json.loads(out.stdout.decode())
    assert d == str(bundle / "boards") and name == "rpi5"
