"""Board profiles (``boards/*.json``): CPU, memory, nominal throughput, power, energy sensor, backend.

The boards directory is looked up next to the runtime package (``<runtime>/../boards``), which
holds both in the repository and in an exported bundle. Python 3.8 compatible, stdlib only.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

__all__ = ["BoardError", "ENERGY_SENSORS", "BACKENDS", "default_boards_dir", "list_boards", "load_board", "validate_board",
           "allow_spinning"]

SCHEMA = "eetool.board/1"
ENERGY_SENSORS = ("none", "ina3221", "pmic", "rapl")
BACKENDS = ("litert", "onnxruntime")
#: every profile must say where each of these figures comes from.
SOURCED_FIELDS = ("cpu", "memory_mb", "compute", "power", "energy_sensor", "backend", "python")


class BoardError(ValueError):
    """Unknown board name, unreadable file or a profile that fails validation."""


def default_boards_dir() -> str:
    """``<directory of the runtime package>/../boards`` (absolute path)."""
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "boards"))


def list_boards(boards_dir: Optional[str] = None) -> List[str]:
    """Sorted names of the profiles (``*.json`` stems) in ``boards_dir`` (default: :func:`default_boards_dir`)."""
    d = boards_dir or default_boards_dir()
    if not os.path.isdir(d):
        return []
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".json"))


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_board(profile: Dict[str, Any], where: str = "board") -> Dict[str, Any]:
    """Check a profile's fields and types; returns it unchanged.

    Raises:
        BoardError: listing every problem found.
    """
    errs: List[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errs.append(msg)

    if not isinstance(profile, dict):
        raise BoardError("%s: profile must be a JSON object" % where)
    need(profile.get("schema") == SCHEMA, "schema must be %r" % SCHEMA)
    for key in ("name", "display_name", "architecture", "python", "os"):
        need(isinstance(profile.get(key), str) and profile.get(key) != "", "%s must be a non-empty string" % key)
    cpu = profile.get("cpu")
    if isinstance(cpu, dict):
        need(isinstance(cpu.get("model"), str), "cpu.model must be a string")
        cores = cpu.get("cores")
        need(cores is None or (isinstance(cores, int) and not isinstance(cores, bool) and cores > 0),
             "cpu.cores must be a positive int or null")
        clk = cpu.get("clock_mhz")
        need(clk is None or (_num(clk) and clk > 0), "cpu.clock_mhz must be > 0 or null")
    else:
        errs.append("cpu must be an object")
    mem = profile.get("memory_mb")
    need(mem is None or (isinstance(mem, int) and not isinstance(mem, bool) and mem > 0), "memory_mb must be a positive int or null")
    comp = profile.get("compute")
    need(isinstance(comp, dict) and _num(comp.get("gflops_sustained")) and comp["gflops_sustained"] > 0,
         "compute.gflops_sustained must be a number > 0")
    power = profile.get("power")
    if isinstance(power, dict) and _num(power.get("idle_w")) and _num(power.get("active_w")):
        need(0 <= power["idle_w"] <= power["active_w"], "power: need 0 <= idle_w <= active_w")
    else:
        errs.append("power must be {idle_w: number, active_w: number}")
    need(profile.get("energy_sensor") in ENERGY_SENSORS, "energy_sensor must be one of %s" % list(ENERGY_SENSORS))
    be = profile.get("backend")
    if isinstance(be, dict):
        need(be.get("preferred") in BACKENDS, "backend.preferred must be one of %s" % list(BACKENDS))
        th = be.get("threads")
        need(th is None or (isinstance(th, int) and not isinstance(th, bool) and th > 0), "backend.threads must be a positive int or null")
        need(isinstance(be.get("allow_spinning", False), bool), "backend.allow_spinning must be true or false")
    else:
        errs.append("backend must be an object")
    src = profile.get("sources")
    if isinstance(src, dict):
        missing = [k for k in SOURCED_FIELDS if not isinstance(src.get(k), str) or not src.get(k)]
        need(not missing, "sources lacks an entry for %s" % missing)
    else:
        errs.append("sources must be an object naming where each figure comes from")
    if errs:
        raise BoardError("%s: invalid board profile: %s" % (where, "; ".join(errs)))
    return profile


def load_board(name_or_path: str, boards_dir: Optional[str] = None) -> Dict[str, Any]:
    """Load and validate a board profile.

    Args:
        name_or_path: a board name (``"rpi4"``) looked up in ``boards_dir``, or a path to a JSON
            file (anything containing a path separator or ending in ``.json``).
        boards_dir: directory of profiles (default: :func:`default_boards_dir`).

    Returns:
        The profile dict (see boards/*.json).

    Raises:
        BoardError: unknown name (the message lists the valid names), unreadable / invalid JSON,
            or a profile that fails :func:`validate_board`.
    """
    text = str(name_or_path)
    if text.endswith(".json") or os.sep in text or (os.altsep and os.altsep in text):
        path = text
        if not os.path.isfile(path):
            raise BoardError("board profile file %r not found" % path)
    else:
        d = boards_dir or default_boards_dir()
        path = os.path.join(d, text + ".json")
        if not os.path.isfile(path):
            names = list_boards(d)
            raise BoardError("unknown board %r; valid names: %s (in %s)" % (text, ", ".join(names) or "(none)", d))
    try:
        with open(path, "r", encoding="utf-8") as fh:
            profile = json.load(fh)
    except (OSError, ValueError) as exc:
        raise BoardError("cannot read board profile %s: %s" % (path, exc))
    validate_board(profile, where=path)
    by_name = not (text.endswith(".json") or os.sep in text or (os.altsep and os.altsep in text))
    if by_name and profile["name"] != text:
        raise BoardError("%s: field name %r does not match the file name %r" % (path, profile["name"], text))
    return profile


# ----------------------------------------------------------------------------------- runtime settings
def allow_spinning(board: Optional[Dict[str, Any]], override: Optional[str] = None) -> bool:
    """Whether onnxruntime's idle worker threads may spin-wait (``--spinning on|off`` wins, else the
    profile's ``backend.allow_spinning``, else False: on a board, spinning between inferences burns CPU
    time and energy for a slightly earlier wake-up). Raises BoardError for another ``override``."""
    if override is not None:
        if override not in ("on", "off"):
            raise BoardError("--spinning %r: expected on or off" % override)
        return override == "on"
    return bool(((board or {}).get("backend") or {}).get("allow_spinning", False))
