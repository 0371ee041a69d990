"""The runtime must import without heavy packages and stay Python 3.8 compatible.

1. A subprocess installs an import hook that refuses torch, tensorflow and onnx (but not
   onnxruntime) - and, in a second run, also zstandard / lz4 / psutil - then imports every module
   under runtime/ and checks none of them slipped in.
2. Every runtime file is byte-compiled with Python 3.8 when /root/.pyenv/versions/3.8.18/bin/python
   (or $EETOOL_PY38) exists, else with the current interpreter (always asserted, never skipped).
   (runtime/__main__ is byte-compiled but not imported: importing it would run the CLI.)
3. When a 3.8 virtual environment with numpy + pytest exists (default <repo>/build/py38, or
   $EETOOL_PY38_VENV), the runtime-only tests (codec, protocol, link, server, energy, boards, manifest,
   quant) run under it. Create one with:
       /root/.pyenv/versions/3.8.18/bin/python -m venv build/py38
       build/py38/bin/pip install "numpy==1.24.4" "pytest<8.4" zstandard lz4
   (brotli too, for that codec's tests). They run with --noconftest: tests/conftest.py needs torch, which the 3.8 venv does not have.
What ran is written to the test's properties, to stdout and (warning) to the summary when 3.8 was absent.
"""
import glob
import json
import os
import subprocess
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_FILES = sorted(glob.glob(os.path.join(REPO, "runtime", "*.py")))
PY38 = os.environ.get("EETOOL_PY38", "/root/.pyenv/versions/3.8.18/bin/python")
#: runtime-only test files (no torch) that also run under the 3.8 venv.
PY38_TESTS = ["tests/test_codec.py", "tests/test_nbit.py", "tests/test_protocol.py", "tests/test_link.py",
              "tests/test_server.py", "tests/test_batching.py", "tests/test_energy.py", "tests/test_boards.py",
              "tests/test_bandwidth.py", "tests/test_manifest.py", "tests/test_quant.py"]
PY38_VENV = os.environ.get("EETOOL_PY38_VENV", os.path.join(REPO, "build", "py38"))

HOOK = r"""
import sys, importlib, pkgutil, json
BLOCKED = set(sys.argv[2].split(","))
class Block(object):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked heavy package: " + name)
        return None
    find_module = None
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import runtime
names = sorted(m.name for m in pkgutil.iter_modules(runtime.__path__) if m.name != "__main__")
for n in names:
    importlib.import_module("runtime." + n)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"modules": names, "leaked": leaked}))
"""


def _import_all(blocked):
    out = subprocess.run([sys.executable, "-c", HOOK, REPO, ",".join(blocked)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr.decode()
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def test_runtime_imports_without_heavy_packages():
    res = _import_all(["torch", "tensorflow", "onnx", "onnxscript", "jax"])
    expected = {"boards", "client", "codec", "energy", "link", "protocol", "server", "batching", "serving", "providers",
                "loadtest", "ray_engine"}
    assert expected <= set(res["modules"]), res
    assert res["leaked"] == []


def test_runtime_imports_without_optional_packages():
    # ray: the scale-out engine's package is imported only by serve --engine ray, never at import time
    res = _import_all(["torch", "tensorflow", "onnx", "zstandard", "lz4", "psutil", "matplotlib", "ray"])
    assert res["leaked"] == []


def test_hook_really_blocks():
    code = HOOK.replace("import runtime", "import onnx\nimport runtime")
    out = subprocess.run([sys.executable, "-c", code, REPO, "onnx"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=60)
    assert out.returncode != 0 and b"blocked heavy package" in out.stderr


def _py_compile(python):
    out = subprocess.run([python, "-m", "py_compile"] + RUNTIME_FILES, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=120)
    return out.returncode, (out.stdout + out.stderr).decode()


def test_python38_compatibility(record_property):
    record = {}
    assert len(RUNTIME_FILES) >= 8
    have38 = os.path.exists(PY38)
    python = PY38 if have38 else sys.executable
    rc, text = _py_compile(python)
    record["py_compile"] = {"python": python, "files": len(RUNTIME_FILES), "rc": rc}
    assert rc == 0, text
    if not have38:
        warnings.warn("Python 3.8 not found at %s: runtime byte-compiled with %s only" % (PY38, sys.executable))

    venv_py = os.path.join(PY38_VENV, "bin", "python")
    ran = False
    if have38 and os.path.exists(venv_py):
        probe = subprocess.run([venv_py, "-c", "import sys, numpy, pytest; print(sys.version.split()[0], numpy.__version__)"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        if probe.returncode == 0:
            ver = probe.stdout.decode().split()
            out = subprocess.run([venv_py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--noconftest",
                                  ] + PY38_TESTS,
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
            tail = out.stdout.decode().strip().splitlines()[-1:]
            record["py38_tests"] = {"python": ver[0], "numpy": ver[1], "rc": out.returncode, "summary": tail}
            assert ver[0].startswith("3.8.")
            assert out.returncode == 0, out.stdout.decode()[-4000:]
            ran = True
    if not ran:
        record["py38_tests"] = "not run: no 3.8 venv with numpy+pytest at %s" % PY38_VENV
        warnings.warn("runtime tests NOT run under Python 3.8 (%s)" % record["py38_tests"])
    record_property("py38", json.dumps(record))
    print("py38 check:", json.dumps(record))
