"""Board profiles (``boards/*.json``): CPU, memory, nominal throughput, power, energy sensor, backend, and
whether this machine is the board a profile describes (:func:`check_board`), and the pinned pip
requirements of the board side (``requirements``, written into every bundle's ``requirements/BOARD.txt``
and checked on aarch64 by ``make board-check``).

The boards directory is looked up next to the runtime package (``<runtime>/../boards``), which
holds both in the repository and in an exported bundle. Python 3.8 compatible, stdlib only.
"""
from __future__ import annotations

import json
import os
import platform
import re
import sys
from typing import Any, Dict, List, Optional

__all__ = ["BoardError", "BoardMismatch", "ENERGY_SENSORS", "BACKENDS", "default_boards_dir", "list_boards", "load_board",
           "validate_board", "allow_spinning", "this_machine", "board_mismatch", "check_board", "matching_boards",
           "requirements_text"]

SCHEMA = "eetool.board/1"
ENERGY_SENSORS = ("none", "ina3221", "pmic", "rapl")
BACKENDS = ("litert", "onnxruntime")
#: every profile must say where each of these figures comes from.
SOURCED_FIELDS = ("cpu", "memory_mb", "compute", "power", "energy_sensor", "backend", "python", "requirements")
#: a pinned requirement: ``name==version``
_PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][0-9A-Za-z.+!-]*$")


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
    det = profile.get("detect", {})
    need(isinstance(det, dict) and isinstance(det.get("device_tree_model", ""), str),
         "detect must be an object whose device_tree_model is a string")
    req = profile.get("requirements")
    if isinstance(req, list) and req:
        loose = [r for r in req if not isinstance(r, str) or not _PIN.match(r)]
        need(not loose, "requirements must pin every package as name==version, got %s" % loose)
    else:
        errs.append("requirements must be a non-empty list of pins (name==version) for the board side")
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


def requirements_text(profile: Dict[str, Any]) -> str:
    """The board's ``requirements`` as a pip requirements file (one pin per line, a header saying so)."""
    return ("# pip install -r this file on the board (wheels only); from boards/%s.json\n" % profile["name"]
            + "\n".join(profile["requirements"]) + "\n")


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


# ----------------------------------------------------------------------------------- is this the board?
class BoardMismatch(BoardError):
    """A board profile that does not describe the machine the command runs on (architecture, CPU core or
    board model differ): measurements would describe this machine under the board's name."""


#: ARM "CPU part" numbers in /proc/cpuinfo (Linux arch/arm64/include/asm/cputype.h, ARM_CPU_PART_*)
ARM_CPU_PARTS = {"Cortex-A53": "0xd03", "Cortex-A55": "0xd05", "Cortex-A57": "0xd07", "Cortex-A72": "0xd08",
                 "Cortex-A73": "0xd09", "Cortex-A76": "0xd0b", "Cortex-A78": "0xd41", "Cortex-A78AE": "0xd42",
                 "Cortex-A78C": "0xd4b"}
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def _arch(name: str) -> str:
    return _ARCH_ALIASES.get(name.lower(), name.lower())


def this_machine(root: str = "/") -> Dict[str, Any]:
    """What the board check compares: ``{"architecture": platform.machine(), "cpu_parts": ["0xd08", ...]
    (ARM CPU part numbers from <root>/proc/cpuinfo, empty elsewhere), "cpu_name": x86 "model name" or "",
    "device_tree_model": <root>/proc/device-tree/model, else the "Model" line of /proc/cpuinfo, or ""}``."""
    info: Dict[str, Any] = {"architecture": platform.machine(), "cpu_parts": [], "cpu_name": "", "device_tree_model": ""}
    try:
        with open(os.path.join(root, "proc", "cpuinfo"), "r", errors="replace") as fh:
            for line in fh:
                raw, _, value = line.partition(":")
                key, value = raw.strip().lower(), value.strip()
                if key == "cpu part" and value.lower() not in info["cpu_parts"]:
                    info["cpu_parts"].append(value.lower())
                elif key == "model name" and not info["cpu_name"]:
                    info["cpu_name"] = value
                elif raw.strip() == "Model" and value:  # Raspberry Pi kernels name the board here (x86: "model")
                    info["device_tree_model"] = value
    except OSError:
        pass
    try:
        with open(os.path.join(root, "proc", "device-tree", "model"), "rb") as fh:
            info["device_tree_model"] = fh.read().decode("utf-8", "replace").strip("\x00 \n") or info["device_tree_model"]
    except OSError:
        pass
    return info


def _describe_machine(m: Dict[str, Any]) -> str:
    parts = [m.get("architecture") or "unknown architecture"]
    names = {v: k for k, v in ARM_CPU_PARTS.items()}
    if m.get("cpu_parts"):
        parts.append("/".join(names.get(p, "CPU part " + p) for p in m["cpu_parts"]))
    if m.get("cpu_name"):
        parts.append(m["cpu_name"])
    if m.get("device_tree_model"):
        parts.append(m["device_tree_model"])
    return ", ".join(parts)


def _mismatch(profile: Dict[str, Any], m: Dict[str, Any]):
    """(reasons the profile does not describe machine ``m``, whether the architecture itself differs)."""
    want_arch = _arch(str(profile.get("architecture", "")))
    have_arch = _arch(str(m.get("architecture", "")))
    if want_arch and have_arch and want_arch != have_arch:
        return ["architecture %s, this machine is %s" % (want_arch, have_arch)], True
    why = []
    core = str((profile.get("cpu") or {}).get("model", ""))
    part = ARM_CPU_PARTS.get(core)
    if part and m.get("cpu_parts") and part not in m["cpu_parts"]:
        names = {v: k for k, v in ARM_CPU_PARTS.items()}
        why.append("CPU %s, this machine has %s" % (core, "/".join(names.get(c, "CPU part " + c) for c in m["cpu_parts"])))
    dt = (profile.get("detect") or {}).get("device_tree_model")
    if dt and m.get("device_tree_model") and dt.lower() not in m["device_tree_model"].lower():
        why.append("board model %r, this machine is %r" % (dt, m["device_tree_model"]))
    return why, False


def board_mismatch(profile: Dict[str, Any], machine: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Why ``profile`` does not describe ``machine`` (default :func:`this_machine`), or None when it may:
    the architecture must match; on ARM, a profile naming a Cortex core needs that core among the
    machine's CPU parts; a profile with ``detect.device_tree_model`` needs it in the machine's
    device-tree model (when the machine has one). What cannot be read is not held against the board."""
    m = this_machine() if machine is None else machine
    why, _ = _mismatch(profile, m)
    if not why:
        return None
    return "board profile %r (%s) does not describe this machine (%s): %s" % (
        profile.get("name"), profile.get("display_name"), _describe_machine(m), "; ".join(why))


def matching_boards(machine: Optional[Dict[str, Any]] = None, boards_dir: Optional[str] = None) -> List[str]:
    """Names of the profiles in ``boards_dir`` that :func:`board_mismatch` finds no fault with."""
    m = this_machine() if machine is None else machine
    return [n for n in list_boards(boards_dir) if board_mismatch(load_board(n, boards_dir), m) is None]


def check_board(profile: Dict[str, Any], force: bool = False, advice: str = "",
                machine: Optional[Dict[str, Any]] = None) -> None:
    """Refuse to measure under a board's name on a machine that is not that board. Raises
    :class:`BoardMismatch` (the reason, ``advice`` on what to run instead, the profiles that do match this
    machine, and the override) unless ``force`` (the user knows better than the CPU / board-model
    detection: ``--force-board``). A different CPU architecture is refused even then: no latency measured
    on it can be the board's."""
    m = this_machine() if machine is None else machine
    why, arch = _mismatch(profile, m)
    if not why or (force and not arch):
        return
    name = profile.get("name")
    fits = matching_boards(m)
    msg = ("%s. Measured here, the report would show this machine's latency under the name %s and its energy "
           "from the %s power model. %s%s%s" % (
               board_mismatch(profile, m), name, name, advice + " " if advice else "",
               "Profiles that match this machine: %s. " % ", ".join(fits) if fits else "",
               "" if arch else "If this machine is a %s after all, pass --force-board (make: FORCE_BOARD=1)." % name))
    raise BoardMismatch(msg.strip())


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m runtime.boards check NAME [--force] [--advice TEXT]``: exit 0 when this machine may be
    board NAME, else print why (and what to run instead) and exit 2. ``python -m runtime.boards detect``:
    this machine's facts and the profiles that match it."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m runtime.boards")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="is this machine the board NAME?")
    c.add_argument("name")
    c.add_argument("--force", action="store_true", help="the user says it is")
    c.add_argument("--advice", default="", help="what to run instead, appended to the refusal")
    sub.add_parser("detect", help="this machine's architecture, CPU and board model, and the matching profiles")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "detect":
            print(json.dumps({"machine": this_machine(), "matching_boards": matching_boards()}, indent=2))
            return 0
        check_board(load_board(args.name), force=args.force, advice=args.advice)
    except BoardError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
