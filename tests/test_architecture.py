"""Import direction between the packages (docs/architecture.md), read from the source with ``ast``:
model -> graphs -> bundle -> runtime -> report, with no way back.

- runtime/ (copied to boards, Python 3.8, numpy + one interpreter) imports nothing of toolkit/, calibration/,
  bench/ or scripts/, and none of torch, tensorflow, onnx or click; its library modules do not import its
  command line (runtime/__main__.py);
- calibration/ imports the runtime, never the toolkit;
- the toolkit's library modules never import its command-line modules (toolkit/cli.py, toolkit/cli_plan.py).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "tensorflow", "onnx", "onnxscript", "click", "jax"}


def imports(path: Path, package: str | None = None) -> set[str]:
    """Absolute dotted names of every module ``path`` imports (relative imports resolved against
    ``package``, by default the file's own; imports inside functions and branches included)."""
    if package is None:
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from . import cli` imports package.cli
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


def _files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_the_scanner_sees_relative_and_nested_imports(tmp_path):
    """The checks below could pass by not seeing anything: prove they see what they must refuse."""
    bad = tmp_path / "probe.py"
    bad.write_text("def f():\n    from .cli import default_data\n    from . import cli_plan\n"
                   "    import torch.nn\n    from runtime import bench\n")
    got = imports(bad, "toolkit")
    assert {"toolkit.cli", "toolkit.cli.default_data", "toolkit.cli_plan", "torch.nn", "runtime.bench"} <= got
    main_style = tmp_path / "bench.py"
    main_style.write_text("from . import __main__ as cli\n")
    assert "runtime.__main__" in imports(main_style, "runtime")


@pytest.mark.parametrize("path", _files("runtime"), ids=lambda p: p.name)
def test_runtime_imports_no_toolkit_calibration_or_heavy_package(path):
    bad = sorted(m for m in imports(path)
                 if _top(m) in {"toolkit", "calibration", "bench", "scripts"} | HEAVY)
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: the runtime runs on boards with numpy and one interpreter"
    if path.name != "__main__.py":
        assert "runtime.__main__" not in imports(path), f"{path.name} imports the runtime's command line"


@pytest.mark.parametrize("path", _files("calibration"), ids=lambda p: p.name)
def test_calibration_does_not_import_the_toolkit(path):
    bad = sorted(m for m in imports(path) if _top(m) == "toolkit")
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


CLI = {"toolkit.cli", "toolkit.cli_plan"}


@pytest.mark.parametrize("path", [p for p in _files("toolkit") if p.name not in ("cli.py", "cli_plan.py")],
                         ids=lambda p: str(p.relative_to(REPO / "toolkit")))
def test_toolkit_library_does_not_import_the_command_line(path):
    bad = sorted(m for m in imports(path) if m in CLI or any(m.startswith(c + ".") for c in CLI))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: move what it needs into a library module"


def test_every_package_was_scanned():
    assert len(_files("runtime")) >= 20 and len(_files("toolkit")) >= 20 and len(_files("calibration")) >= 3
