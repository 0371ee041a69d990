"""`make board-check`: aarch64 wheel check (fast, no qemu) and the full emulated board run (marked `board`).

The fast tests need the package index (PyPI) the project installs from; they take seconds.  The `board` test
needs root, debootstrap and qemu-user-static and minutes; `.ci/run` runs it through `make board-check`.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
CACHE = Path(os.environ.get("BOARD_CHECK_CACHE", "/var/cache/eetool-board-check"))
sys.path.insert(0, str(SCRIPTS))

import board_check_compare  # noqa: E402
import board_check_wheels  # noqa: E402
from board_check_wheels import WheelCheckError, download_wheels  # noqa: E402

# docopt has only ever been published as an sdist (0.1 ... 0.6.2): no wheel for any platform
SDIST_ONLY = "docopt==0.6.2"


def test_sdist_only_package_is_refused_by_name(tmp_path):
    req = tmp_path / "rpi4.txt"
    req.write_text("lz4==4.4.5\n%s\n" % SDIST_ONLY)
    with pytest.raises(WheelCheckError) as err:
        download_wheels(req, tmp_path / "wheels")
    assert err.value.package == "docopt"
    msg = str(err.value)
    assert "no aarch64 wheel for 'docopt'" in msg and str(req) in msg and "build it from source" in msg
    assert not list((tmp_path / "wheels").glob("docopt*")), "nothing of docopt may reach the wheel directory"


def test_board_check_script_stops_before_qemu_with_the_package_name(tmp_path):
    """The shell entry point (`make board-check`) fails in step 1, exit 3, with the clear message."""
    req = tmp_path / "rpi4.txt"
    req.write_text(SDIST_ONLY + "\n")
    env = dict(os.environ, BOARD_CHECK_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(["bash", str(SCRIPTS / "board_check.sh"), "--board", "rpi4", "--requirements", str(req),
                           "--wheels-only"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "no aarch64 wheel for 'docopt'" in proc.stderr
    assert not (tmp_path / "cache" / "rootfs-bookworm-arm64").exists()


def _wheel(path: Path, name: str, version: str, requires: list) -> None:
    dist = "%s-%s.dist-info" % (name, version)
    meta = "Metadata-Version: 2.1\nName: %s\nVersion: %s\n%s" % (
        name, version, "".join("Requires-Dist: %s\n" % r for r in requires))
    with zipfile.ZipFile(path / ("%s-%s-py3-none-any.whl" % (name, version)), "w") as z:
        z.writestr("%s/__init__.py" % name, "")
        z.writestr(dist + "/METADATA", meta)
        z.writestr(dist + "/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(dist + "/RECORD", "")


def _sdist(path: Path, name: str, version: str) -> None:
    with tarfile.open(path / ("%s-%s.tar.gz" % (name, version)), "w:gz") as t:
        data = ("Metadata-Version: 2.1\nName: %s\nVersion: %s\n" % (name, version)).encode()
        info = tarfile.TarInfo("%s-%s/PKG-INFO" % (name, version))
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))


def test_dependency_without_wheel_is_named_with_its_parent(tmp_path, monkeypatch):
    """Offline: a local index where `probe` (a wheel) depends on `nowheelpkg` (sdist only)."""
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index, "probe", "1.0", ["nowheelpkg>=1.0"])
    _sdist(index, "nowheelpkg", "1.0")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    req = tmp_path / "rpi4.txt"
    req.write_text("probe==1.0\n")
    with pytest.raises(WheelCheckError) as err:
        download_wheels(req, tmp_path / "wheels", index_args=["--no-index", "--find-links", str(index)])
    assert err.value.package == "nowheelpkg"
    assert "needed by probe" in str(err.value)


@pytest.mark.parametrize("board", ["rpi3", "rpi4", "rpi5"])
def test_board_requirements_resolve_to_aarch64_wheels(board, tmp_path):
    """The pins in boards/BOARD.json (Raspberry Pi OS bookworm, CPython 3.11) all have manylinux aarch64 wheels."""
    req = tmp_path / ("%s.txt" % board)
    req.write_text(board_check_wheels.board_requirements(board))
    wheels = download_wheels(req, CACHE / "wheels-aarch64")
    names = {w.name.split("-")[0].lower() for w in wheels}
    assert {"numpy", "onnxruntime", "ai_edge_litert", "zstandard", "lz4", "pillow"} <= names
    for w in wheels:
        tag = w.name[:-4].split("-", 2)[2]
        assert tag.endswith("any") or "aarch64" in tag, w.name


def _run(machine, top1=7, conf=0.91, ms=12.5):
    return {"machine": machine, "backend": "onnx", "precision": "fp32", "board": "rpi4",
            "results": [{"input": "a.jpg", "top1": top1, "exit": None, "where": "server", "ms": {"head": ms},
                         "bytes_sent": 100, "confidences": {"final": conf}}]}


def test_compare_accepts_agreement_and_drops_timings(tmp_path):
    host, board = _run("x86_64"), _run("aarch64", conf=0.9105, ms=900.0)
    assert board_check_compare.compare(host, board) == []
    (tmp_path / "h.json").write_text(json.dumps(host))
    (tmp_path / "b.json").write_text(json.dumps(board))
    out = tmp_path / "verdict.json"
    assert board_check_compare.main([str(tmp_path / "h.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 0
    assert '"ms"' not in out.read_text(), "emulated latency must not be reported"


def test_compare_rejects_wrong_machine_and_different_results():
    problems = board_check_compare.compare(_run("x86_64"), _run("x86_64", top1=8, conf=0.5))
    text = "\n".join(problems)
    assert "not aarch64" in text and "top1 differs" in text and "confidence final differs" in text


def test_bundle_requirements_are_the_board_profiles_pins(tmp_path):
    """One source of pins: what a bundle tells the board to install is boards/BOARD.json's requirements, and
    `make board-check` without a bundle checks the same file."""
    from runtime.boards import list_boards, load_board
    from toolkit.bundle_writer import copy_support_files

    copy_support_files(tmp_path, [])
    for board in list_boards(str(REPO / "boards")):
        pins = load_board(board)["requirements"]
        text = (tmp_path / "requirements" / ("%s.txt" % board)).read_text()
        assert [line for line in text.splitlines() if not line.startswith("#")] == pins
        assert board_check_wheels.board_requirements(board) == text
    assert "numpy==1.26.4" in load_board("rpi4")["requirements"]  # the set the emulated board run installs in CI
    assert not (SCRIPTS / "board-requirements-example.txt").exists()


def test_unknown_board_is_refused_before_any_download(tmp_path):
    env = dict(os.environ, BOARD_CHECK_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(SCRIPTS / "board_check_wheels.py"), "--requirements-of", "rpi9"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "unknown board 'rpi9'" in proc.stderr and "rpi4" in proc.stderr


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, effnet, calib_images, verify_images):
    """EfficientNet-Lite0 split mid-network, int8, ONNX and TFLite: what a user copies to a Pi."""
    from toolkit.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("board") / "effnet-b5-int8"
    export_bundle(effnet, ExportOptions(split=["blocks.5"], out=out, int8=True, formats=("onnx", "tflite"),
                                        progress=False), calib_images, verify_images)
    return out


@pytest.mark.board
@pytest.mark.timeout(3600)
def test_bundle_runs_on_emulated_rpi4(int8_bundle):
    """The full check: aarch64 rootfs under qemu (cortex-a72), bundle copied with cp -r, device side in the
    chroot against the edge server on the host, results equal to the host's.  Needs root."""
    proc = subprocess.run(["bash", str(SCRIPTS / "board_check.sh"), "--board", "rpi4", "--bundle", str(int8_bundle)],
                          capture_output=True, text=True, timeout=3500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    verdict = json.loads((CACHE / "board-check" / "last-run-rpi4.json").read_text())
    assert verdict["ok"] and verdict["board_machine"] == "aarch64"
    assert verdict["backend"] == "tflite"  # rpi4's profile prefers LiteRT, and the bundle has TFLite graphs
