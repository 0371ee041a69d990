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


# ----------------------------------------------------------------------------- is this machine the board?
PI3 = {"architecture": "aarch64", "cpu_parts": ["0xd03"], "cpu_name": "", "device_tree_model": "Raspberry Pi 3 Model B Rev 1.2"}
PI4 = {"architecture": "aarch64", "cpu_parts": ["0xd08"], "cpu_name": "", "device_tree_model": "Raspberry Pi 4 Model B Rev 1.4"}
ORIN_NANO = {"architecture": "aarch64", "cpu_parts": ["0xd42"], "cpu_name": "",
             "device_tree_model": "NVIDIA Jetson Orin Nano Developer Kit"}
AGX_ORIN = dict(ORIN_NANO, device_tree_model="NVIDIA Jetson AGX Orin Developer Kit")
X86 = {"architecture": "x86_64", "cpu_parts": [], "cpu_name": "AMD EPYC", "device_tree_model": ""}
BARE_ARM = {"architecture": "aarch64", "cpu_parts": [], "cpu_name": "", "device_tree_model": ""}


@pytest.mark.parametrize("machine,boards", [
    (PI3, ["rpi3"]), (PI4, ["rpi4"]), (ORIN_NANO, ["jetson-orin-nano"]), (AGX_ORIN, ["jetson-agx-orin"]),
    (X86, ["host"]),
    # nothing readable but the architecture: every aarch64 profile may be it
    (BARE_ARM, ["jetson-agx-orin", "jetson-nano", "jetson-orin-nano", "rpi3", "rpi4", "rpi5"]),
])
def test_which_profiles_describe_a_machine(machine, boards):
    assert B.matching_boards(machine) == boards


def test_mismatch_says_what_differs():
    assert "architecture aarch64, this machine is x86_64" in B.board_mismatch(B.load_board("rpi3"), X86)
    why = B.board_mismatch(B.load_board("rpi3"), PI4)
    assert "CPU Cortex-A53, this machine has Cortex-A72" in why
    why = B.board_mismatch(B.load_board("jetson-agx-orin"), ORIN_NANO)
    assert "board model 'AGX Orin'" in why and "Orin Nano" in why
    assert B.board_mismatch(B.load_board("host"), PI3).startswith("board profile 'host'")


def test_check_board_refuses_with_advice_and_force_overrides_detection_not_architecture():
    with pytest.raises(B.BoardMismatch) as e:
        B.check_board(B.load_board("rpi3"), advice="run it on the Pi", machine=PI4)
    msg = str(e.value)
    assert "run it on the Pi" in msg and "Profiles that match this machine: rpi4" in msg and "--force-board" in msg
    B.check_board(B.load_board("rpi3"), force=True, machine=PI4)  # the user knows better than the CPU part
    with pytest.raises(B.BoardMismatch) as e:
        B.check_board(B.load_board("rpi3"), force=True, machine=X86)
    assert "--force-board" not in str(e.value)  # no latency measured on x86 can be a Pi's
    B.check_board(B.load_board("rpi3"), machine=PI3)


def test_this_machine_reads_cpuinfo_and_device_tree(tmp_path):
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "cpuinfo").write_text("processor\t: 0\nCPU part\t: 0xd08\n\nprocessor\t: 1\n"
                                               "CPU part\t: 0xd08\n")
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    m = B.this_machine(str(tmp_path))
    assert m["cpu_parts"] == ["0xd08"] and m["device_tree_model"] == "Raspberry Pi 4 Model B Rev 1.4"
    assert B.matching_boards(dict(m, architecture="aarch64")) == ["rpi4"]  # the architecture is platform.machine()
    (tmp_path / "proc" / "device-tree" / "model").unlink()  # no device tree: the cpuinfo Model line
    (tmp_path / "proc" / "cpuinfo").write_text("CPU part\t: 0xd03\nModel\t\t: Raspberry Pi 3 Model B Plus Rev 1.3\n")
    m = B.this_machine(str(tmp_path))
    assert m["device_tree_model"] == "Raspberry Pi 3 Model B Plus Rev 1.3"
    assert B.matching_boards(dict(m, architecture="aarch64")) == ["rpi3"]
    (tmp_path / "proc" / "cpuinfo").write_text("model\t\t: 49\nmodel name\t: AMD EPYC\n")  # x86's "model" is a number
    assert B.this_machine(str(tmp_path))["device_tree_model"] == "" and B.this_machine(str(tmp_path))["cpu_name"] == "AMD EPYC"


def _other_board():
    """A profile whose architecture this machine does not have."""
    import platform

    return "rpi3" if platform.machine() in ("x86_64", "AMD64") else "host"


def test_bench_refuses_another_board_before_any_work():
    """The refusal comes first: the bundle (here a path that does not exist) is not even looked at."""
    board = _other_board()
    proc = subprocess.run([sys.executable, "-m", "runtime", "bench", "/no/such/bundle", "--board", board],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 2
    assert "does not describe this machine" in proc.stderr and "make bench BOARD=%s" % board in proc.stderr
    assert "no such" not in proc.stderr.lower()


def _make(args, cwd, tmp_path):
    env = dict(os.environ)
    env.pop("MAKEFLAGS", None)
    return subprocess.run(["make", "-s"] + args, cwd=str(cwd), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=120)


def test_repo_make_bench_for_another_board_refuses_at_once(tmp_path):
    board = _other_board()
    venv = sys.prefix
    out = tmp_path / "out"
    p = _make(["bench", "BOARD=%s" % board, "OUT=%s" % out, "VENV=%s" % venv, "-o", "%s/bin/eetool" % venv],
              REPO, tmp_path)
    assert p.returncode != 0
    assert "make bench PLAN_BOARD=%s" % board in p.stderr and "make bench BOARD=%s` in it" % board in p.stderr
    assert not out.exists()  # refused before any export or measurement


def test_requirements_are_pinned_per_board():
    """Each profile carries its board side's pip pins (written into every bundle's requirements/)."""
    for name in B.list_boards():
        reqs = B.load_board(name)["requirements"]
        assert reqs and all("==" in r for r in reqs) and any(r.startswith("numpy==") for r in reqs), name
        assert B.requirements_text(B.load_board(name)).splitlines()[1:] == reqs
    loose = dict(B.load_board("rpi4"), requirements=["numpy>=1.24", "lz4==4.4.5"])
    with pytest.raises(B.BoardError, match="numpy>=1.24"):
        B.validate_board(loose)
    with pytest.raises(B.BoardError, match="requirements must be a non-empty list"):
        B.validate_board(dict(B.load_board("rpi4"), requirements=[]))
