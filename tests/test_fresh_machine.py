"""What `make test` does on a fresh machine before any test runs: Fashion-MNIST (Debian's
dataset-fashion-mnist) is installed when running as root, otherwise make stops at once with the command to
run. Absence is simulated by pointing $EETOOL_FASHION_MNIST at an empty folder; `id` and `apt-get` are fakes
on PATH (nothing is installed or removed on this machine)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from calibration import fashion_mnist as fm

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix) if sys.prefix != sys.base_prefix else None  # the venv running the tests
FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz"]


def fake_bin(tmp_path: Path, uid: int, apt_script: str) -> Path:
    """A PATH folder whose `id -u` prints ``uid`` and whose `apt-get` logs its arguments then runs
    ``apt_script`` (bash; $DATA is the folder the readers look in)."""
    b = tmp_path / "bin"
    b.mkdir()
    (b / "id").write_text("#!/bin/sh\n[ \"$1\" = -u ] && echo %d || exec /usr/bin/id \"$@\"\n" % uid)
    (b / "apt-get").write_text("#!/bin/bash\necho \"$*\" >> \"%s\"\n%s\n" % (tmp_path / "apt.log", apt_script))
    for f in b.iterdir():
        f.chmod(0o755)
    return b


def make(target: str, tmp_path: Path, bindir: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH="%s:%s" % (bindir, os.environ["PATH"]), EETOOL_FASHION_MNIST=str(data), DATA=str(data))
    env.pop("MAKEFLAGS", None)
    args = ["make", "-s", target] + list(extra)
    if VENV is not None:  # the venv this test runs in, never rebuilt from here
        args += ["VENV=%s" % VENV, "-o", "%s/bin/eetool" % VENV]
    return subprocess.run(args, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=120)


def test_env_var_moves_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    assert fm.default_root() == tmp_path
    monkeypatch.delenv(fm.ENV_VAR)
    assert str(fm.default_root()) == fm.DEFAULT_ROOT


def test_not_root_stops_at_once_with_the_command(tmp_path):
    empty = tmp_path / "fm"
    empty.mkdir()
    p = make("fashion-mnist", tmp_path, fake_bin(tmp_path, 1000, "exit 1"), empty)
    assert p.returncode == 2
    assert "sudo apt-get install -y dataset-fashion-mnist" in p.stderr
    assert not (tmp_path / "apt.log").exists()  # nothing attempted without root


def test_root_installs_the_package_updating_lists_once_when_needed(tmp_path):
    empty = tmp_path / "fm"
    empty.mkdir()
    # a fresh machine: the first install fails (no package lists) until `apt-get update` ran
    script = ('case "$1" in update) touch "$DATA/.lists";; install) [ -f "$DATA/.lists" ] || exit 100; '
              'for f in %s; do echo x > "$DATA/$f"; done;; esac' % " ".join(FILES))
    p = make("fashion-mnist", tmp_path, fake_bin(tmp_path, 0, script), empty)
    assert p.returncode == 0, p.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert calls == ["install -y -qq dataset-fashion-mnist", "update -qq", "install -y -qq dataset-fashion-mnist"]
    assert sorted(f.name for f in empty.iterdir() if not f.name.startswith(".")) == sorted(FILES)


def test_root_install_that_does_not_fill_the_folder_is_an_error(tmp_path):
    empty = tmp_path / "fm"
    empty.mkdir()
    p = make("fashion-mnist", tmp_path, fake_bin(tmp_path, 0, "exit 0"), empty)
    assert p.returncode == 2 and "unset it" in p.stderr and "EETOOL_FASHION_MNIST" in p.stderr


def test_present_dataset_needs_nothing(tmp_path):
    data = tmp_path / "fm"
    data.mkdir()
    for f in FILES:
        (data / f).write_bytes(b"x")
    p = make("fashion-mnist", tmp_path, fake_bin(tmp_path, 1000, "exit 1"), data)
    assert p.returncode == 0 and p.stderr == "" and not (tmp_path / "apt.log").exists()


@pytest.mark.parametrize("target", ["test", "reference"])
def test_make_checks_the_dataset_before_running_anything(tmp_path, target):
    """`make -n`: the dataset check comes before pytest / training."""
    p = make(target, tmp_path, fake_bin(tmp_path, 1000, "exit 1"), tmp_path, "-n")
    lines = p.stdout.splitlines()
    check = next(i for i, line in enumerate(lines) if "scripts/fashion_mnist.sh" in line)
    work = next(i for i, line in enumerate(lines) if "pytest" in line or "train_reference" in line)
    assert check < work
