"""Energy measurement on edge boards behind one interface.

``meter = meter_for_board(profile)``; ``with meter: run()``; ``meter.reading`` is an
:class:`EnergyReading` (joules gross and net of idle, mean W, duration s, sample count, source,
``estimated`` flag and a human label).

Sources (chosen from the board profile's ``energy_sensor``):

* ``ina3221``: Jetson on-module INA3221, via the iio driver (Nano / Xavier on L4T 32:
  ``/sys/bus/i2c/drivers/ina3221x/*/iio:device*/in_power<N>_input`` mW + ``rail_name_<N>``) or the
  hwmon driver (Orin on L4T 35/36: ``/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in<N>_input`` mV,
  ``curr<N>_input`` mA, ``in<N>_label``).
* ``pmic``: Raspberry Pi 5 PMIC via ``vcgencmd pmic_read_adc`` (sum of V x I over rails).
* ``rapl``: Intel/AMD RAPL via ``/sys/class/powercap/intel-rapl:<N>/energy_uj`` (wraparound via
  ``max_energy_range_uj``).
* ``csv``: a log written by an external USB power meter (``timestamp,watts`` rows, Unix seconds).
* ``estimate``: idle/active W from the board profile x CPU utilisation (/proc/stat, or psutil);
  always ``estimated=True`` and labelled ESTIMATED.

Power sensors are sampled by a background thread (>= 10 Hz, default 20 Hz) and integrated with
the trapezoid rule; counters (RAPL) are differenced. Every filesystem path and the vcgencmd
executable are injectable so tests run against fake trees. Python 3.8 compatible, stdlib + numpy-free.
"""
from __future__ import annotations

import csv
import glob
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "EnergyReading", "EnergyError", "SensorUnavailable", "EnergyMeter", "SampledEnergyMeter", "CsvEnergyMeter",
    "Ina3221Sensor", "PmicSensor", "RaplSensor", "EstimateSensor", "integrate_trapezoid", "parse_pmic_adc",
    "meter_for_board", "parse_rails", "MIN_HZ",
]

MIN_HZ = 10.0
#: INA3221 rail names that measure the whole module / board input (used alone when present).
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VIN", "VDD_IN_TOTAL")


class EnergyError(RuntimeError):
    """Measurement could not be produced (meter misuse, no samples in a CSV window, ...)."""


class SensorUnavailable(EnergyError):
    """The requested sensor is absent or unreadable on this machine."""


@dataclass
class EnergyReading:
    """Result of one measurement window.

    Attributes:
        joules: gross energy over the window (J).
        mean_w: joules / duration_s (W).
        duration_s: window length (s).
        samples: number of power / counter samples used.
        source: sensor id, e.g. "ina3221:VDD_IN", "pmic", "rapl:package-0", "csv:<path>", "estimate:rpi4".
        estimated: True when the figure is a model, not a measurement.
        label: one human-readable line; starts with "ESTIMATED" when estimated.
        idle_w: idle power subtracted for the net figure (W), or None.
        idle_source: "measured", "profile", "given" or None.
        net_joules: joules - idle_w * duration_s (J; may be slightly negative from noise), or None.
        rails: the sensor rails summed into the figure (INA3221 / PMIC), or None.
        rails_skipped: rail -> why it was left out (present but unreadable, e.g. a disabled INA3221
            channel), or None.
    """

    joules: float
    mean_w: float
    duration_s: float
    samples: int
    source: str
    estimated: bool
    label: str = ""
    idle_w: Optional[float] = None
    idle_source: Optional[str] = None
    net_joules: Optional[float] = None
    rails: Optional[List[str]] = None
    rails_skipped: Optional[Dict[str, str]] = None

    def to_json(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def integrate_trapezoid(ts: Sequence[float], ws: Sequence[float]) -> float:
    """Trapezoid integral of power samples.

    Args:
        ts: sample times in s (non-decreasing).
        ws: power in W at those times.

    Returns:
        Energy in J (0.0 for fewer than two samples).
    """
    total = 0.0
    for i in range(1, len(ts)):
        total += 0.5 * (ws[i] + ws[i - 1]) * (ts[i] - ts[i - 1])
    return total


def _read_float(path: str) -> float:
    with open(path, "r") as fh:
        return float(fh.read().strip())


def _label(path: str, default: str) -> str:
    """A channel's label file, or ``default`` when it is absent, empty or unreadable."""
    try:
        return _read_text(path) or default
    except OSError:
        return default


def _reason(exc: BaseException) -> str:
    """Short reason for an unreadable sensor file: ``"[Errno 5] Input/output error"`` style."""
    if isinstance(exc, OSError) and exc.strerror:
        return "[Errno %s] %s" % (exc.errno, exc.strerror)
    return str(exc) or type(exc).__name__


def _read_text(path: str) -> str:
    with open(path, "r") as fh:
        return fh.read().strip()


def _under(root: str, abspath: str) -> str:
    return os.path.join(root, abspath.lstrip("/"))


# ============================================================================ sensors
class _Sensor(object):
    """Base: ``cumulative`` False -> :meth:`read` returns W; True -> returns J since an origin."""

    cumulative = False
    estimated = False
    source = "sensor"
    description = ""

    def read(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


def parse_rails(text: Optional[str]) -> Optional[List[str]]:
    """``--energy-rails`` value -> rail names: ``"VDD_CPU_CV,VDD_GPU_SOC"`` -> ``["VDD_CPU_CV", "VDD_GPU_SOC"]``;
    None, ``""`` or ``"auto"`` -> None (the sensor's default choice); ``"sum"`` -> ``["sum"]`` (every
    readable rail)."""
    if text is None or not str(text).strip() or str(text).strip() == "auto":
        return None
    return [r.strip() for r in str(text).split(",") if r.strip()]


class Ina3221Sensor(_Sensor):
    """Jetson INA3221 power monitor (instantaneous W).

    Every channel is probed once: a channel that is present but unreadable (a disabled or unconnected
    INA3221 channel, as on the AGX Orin's second monitor at 1-0041, reads fail with EIO / ENODATA) is
    left out and named in :attr:`skipped` and in the description, instead of losing the whole sensor.

    Args:
        root: filesystem root that contains ``sys/`` (default "/"; tests pass a tmp dir).
        rail: "auto" (the total-input rail VDD_IN / POM_5V_IN if present and readable, else the sum of
            every readable rail), "sum" (every readable rail), a rail name, or a list of rail names
            (summed).

    Attributes:
        selected: rail names summed by :meth:`read`.
        skipped: rail name -> reason, for channels found but unreadable.

    Raises:
        SensorUnavailable: no INA3221 channel found or none readable; a rail asked for by name that does
            not exist (the message lists the rails) or cannot be read.
    """

    IIO_GLOB = "sys/bus/i2c/drivers/ina3221x/*/iio:device*"
    HWMON_GLOBS = ("sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*",)

    def __init__(self, root: str = "/", rail: Any = "auto"):
        self.root = root
        self.channels = self.discover(root)  # list of (rail name, reader)
        if not self.channels:
            raise SensorUnavailable("no INA3221 channels under %s (looked for %s and %s)"
                                    % (root, self.IIO_GLOB, ", ".join(self.HWMON_GLOBS)))
        self.skipped: Dict[str, str] = {}
        readable = []
        for name, reader in self.channels:
            try:
                reader()
                readable.append(name)
            except (OSError, ValueError) as exc:
                self.skipped[name] = _reason(exc)
        names = [n for n, _ in self.channels]
        wanted = [rail] if isinstance(rail, str) else list(rail)
        if wanted == ["auto"]:
            total = [n for n in readable if n.upper() in TOTAL_RAILS]
            self.selected = total[:1] if total else readable
        elif wanted == ["sum"]:
            self.selected = readable
        else:
            unknown = [r for r in wanted if r not in names]
            if unknown:
                raise SensorUnavailable("INA3221 rail %s not found; rails: %s" % (", ".join(unknown), ", ".join(names)))
            bad = ["%s (%s)" % (r, self.skipped[r]) for r in wanted if r in self.skipped]
            if bad:
                raise SensorUnavailable("INA3221 rail %s present but unreadable; readable rails: %s"
                                        % (", ".join(bad), ", ".join(readable) or "none"))
            self.selected = wanted
        if not self.selected:
            raise SensorUnavailable("no readable INA3221 channel: %s" % ", ".join(
                "%s (%s)" % kv for kv in self.skipped.items()))
        self._readers = [r for n, r in self.channels if n in self.selected]
        self.read()  # probe: raises SensorUnavailable if unreadable
        self.rails = list(self.selected)
        self.source = "ina3221:" + "+".join(self.selected)
        self.description = "Jetson INA3221 %s (rails available: %s%s)" % (
            "+".join(self.selected), ", ".join(readable),
            "; unreadable, left out: " + ", ".join(sorted(self.skipped)) if self.skipped else "")

    @classmethod
    def discover(cls, root: str = "/") -> List[Tuple[str, Callable[[], float]]]:
        """All (rail name, reader returning W) channels found under ``root``."""
        found: List[Tuple[str, Callable[[], float]]] = []
        seen = set()
        for dev in sorted(glob.glob(os.path.join(root, cls.IIO_GLOB))):
            for pfile in sorted(glob.glob(os.path.join(dev, "in_power*_input"))):
                m = re.search(r"in_power(\d+)_input$", pfile)
                if not m:
                    continue
                n = m.group(1)
                name_file = os.path.join(dev, "rail_name_%s" % n)
                name = _label(name_file, "%s:ch%s" % (os.path.basename(os.path.dirname(dev)), n))
                key = (os.path.realpath(dev), n)
                if key in seen:
                    continue
                seen.add(key)
                found.append((name, (lambda p=pfile: _read_float(p) / 1000.0)))  # mW -> W
        for pattern in cls.HWMON_GLOBS:
            for dev in sorted(glob.glob(os.path.join(root, pattern))):
                for cfile in sorted(glob.glob(os.path.join(dev, "curr*_input"))):
                    m = re.search(r"curr(\d+)_input$", cfile)
                    if not m:
                        continue
                    n = m.group(1)
                    vfile = os.path.join(dev, "in%s_input" % n)
                    pfile = os.path.join(dev, "power%s_input" % n)
                    lfile = os.path.join(dev, "in%s_label" % n)
                    if not os.path.exists(lfile):
                        lfile = os.path.join(dev, "curr%s_label" % n)
                    name = _label(lfile, "%s:ch%s" % (os.path.basename(os.path.dirname(os.path.dirname(dev))), n))
                    key = (os.path.realpath(dev), n)
                    if key in seen:
                        continue
                    if os.path.exists(pfile):
                        reader = (lambda p=pfile: _read_float(p) / 1e6)  # uW -> W
                    elif os.path.exists(vfile):
                        reader = (lambda v=vfile, c=cfile: _read_float(v) * _read_float(c) / 1e6)  # mV*mA -> W
                    else:
                        continue
                    seen.add(key)
                    found.append((name, reader))
        return found

    def read(self) -> float:
        try:
            return float(sum(r() for r in self._readers))
        except (OSError, ValueError) as exc:
            raise SensorUnavailable("cannot read INA3221: %s" % exc)


_PMIC_RE = re.compile(r"^\s*(\S+?)_([AV])\s+(current|volt)\(\d+\)=\s*([-+0-9.eE]+)\s*[AV]?\s*$")


def parse_pmic_adc(text: str) -> Dict[str, float]:
    """Parse ``vcgencmd pmic_read_adc`` output into rail -> W (V x I for rails that have both).

    Lines look like ``  VDD_CORE_A current(7)=2.04500000A`` and ``  VDD_CORE_V volt(15)=0.72000000V``;
    rails with only a voltage (EXT5V_V, BATT_V) are ignored.
    """
    amps: Dict[str, float] = {}
    volts: Dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC_RE.match(line)
        if not m:
            continue
        rail, kind, _, value = m.groups()
        (amps if kind == "A" else volts)[rail] = float(value)
    return {rail: volts[rail] * amps[rail] for rail in sorted(set(amps) & set(volts))}


class PmicSensor(_Sensor):
    """Raspberry Pi 5 PMIC rails through ``vcgencmd pmic_read_adc`` (instantaneous W, sum of rails).

    Covers the PMIC's own rails only (no USB peripherals, no 5 V input losses): lower than an
    inline USB-C meter. Each read spawns vcgencmd (a few ms of CPU).

    Args:
        vcgencmd: path or name of the vcgencmd executable.
        timeout_s: limit for one vcgencmd call (s).

    Raises:
        SensorUnavailable: vcgencmd missing, failing, or printing no rail pairs (e.g. a Pi 4).
    """

    source = "pmic"

    def __init__(self, vcgencmd: str = "vcgencmd", timeout_s: float = 2.0, rails: Optional[List[str]] = None):
        self.vcgencmd = vcgencmd
        self.timeout_s = float(timeout_s)
        found = self.read_rails()
        if rails and rails != ["sum"]:
            unknown = [r for r in rails if r not in found]
            if unknown:
                raise SensorUnavailable("PMIC rail %s not found; rails: %s" % (", ".join(unknown), ", ".join(sorted(found))))
            self.selected: Optional[List[str]] = list(rails)
        else:
            self.selected = None  # every rail
        self.rails = self.selected or sorted(found)
        self.skipped: Dict[str, str] = {}
        self.description = "Raspberry Pi 5 PMIC, %s (vcgencmd pmic_read_adc)" % (
            "+".join(self.selected) if self.selected else "sum of %d rails" % len(found))

    def read_rails(self) -> Dict[str, float]:
        """rail -> W from one vcgencmd call."""
        try:
            out = subprocess.run([self.vcgencmd, "pmic_read_adc"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 timeout=self.timeout_s, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise SensorUnavailable("cannot run %s pmic_read_adc: %s" % (self.vcgencmd, exc))
        if out.returncode != 0:
            raise SensorUnavailable("%s pmic_read_adc exited %d: %s" % (self.vcgencmd, out.returncode,
                                                                      out.stderr.decode("utf-8", "replace").strip()[:200]))
        rails = parse_pmic_adc(out.stdout.decode("utf-8", "replace"))
        if not rails:
            raise SensorUnavailable("%s pmic_read_adc printed no rail voltage/current pairs (not a Pi 5?)" % self.vcgencmd)
        return rails

    def read(self) -> float:
        rails = self.read_rails()
        return float(sum(rails[r] for r in self.selected) if self.selected else sum(rails.values()))


class RaplSensor(_Sensor):
    """Intel / AMD RAPL package energy counters (cumulative J, wraparound handled).

    Uses the top-level zones ``intel-rapl:<N>`` named ``package-*`` (summed over sockets); if
    none is named so, every top-level zone. Sub-zones (core, uncore, dram) are not added since
    they are inside the package figure.

    Args:
        root: filesystem root containing ``sys/class/powercap`` (default "/").

    Raises:
        SensorUnavailable: no zone, or energy_uj unreadable (root-only since Linux 5.10).
    """

    cumulative = True

    def __init__(self, root: str = "/"):
        base = os.path.join(root, "sys/class/powercap")
        zones = [z for z in sorted(glob.glob(os.path.join(base, "intel-rapl:*")))
                 if re.search(r"intel-rapl:\d+$", z)]
        if not zones:
            raise SensorUnavailable("no RAPL zones under %s (VM or non-x86 machine?)" % base)
        named = []
        for z in zones:
            try:
                named.append((z, _read_text(os.path.join(z, "name"))))
            except OSError:
                named.append((z, os.path.basename(z)))
        pkg = [(z, n) for z, n in named if n.startswith("package")]
        self.zones = pkg or named
        self._max: List[float] = []
        self._prev: List[Optional[float]] = []
        self._acc_uj: List[float] = []
        for z, _ in self.zones:
            try:
                self._max.append(_read_float(os.path.join(z, "max_energy_range_uj")))
                self._prev.append(_read_float(os.path.join(z, "energy_uj")))
            except (OSError, ValueError) as exc:
                raise SensorUnavailable("cannot read RAPL zone %s: %s (energy_uj is root-only on Linux >= 5.10)" % (z, exc))
            self._acc_uj.append(0.0)
        self._lock = threading.Lock()
        self.source = "rapl:" + "+".join(n for _, n in self.zones)
        self.description = "RAPL %s (CPU package only, not the whole machine)" % "+".join(n for _, n in self.zones)

    @staticmethod
    def delta_uj(prev: float, cur: float, max_range: float) -> float:
        """Counter increase from ``prev`` to ``cur`` (uJ), assuming at most one wrap at ``max_range``."""
        return cur - prev if cur >= prev else cur + (max_range - prev)

    def read(self) -> float:
        with self._lock:
            for i, (z, _) in enumerate(self.zones):
                try:
                    cur = _read_float(os.path.join(z, "energy_uj"))
                except (OSError, ValueError) as exc:
                    raise SensorUnavailable("cannot read RAPL zone %s: %s" % (z, exc))
                self._acc_uj[i] += self.delta_uj(self._prev[i], cur, self._max[i])
                self._prev[i] = cur
            return sum(self._acc_uj) / 1e6


class EstimateSensor(_Sensor):
    """Model power: ``idle_w + (active_w - idle_w) x CPU utilisation`` (W). Always estimated.

    Utilisation comes from ``<proc_root>/proc/stat`` deltas between reads (the first read uses
    the since-boot average), or psutil when /proc/stat is absent.

    Args:
        idle_w, active_w: board power at idle and at full CPU load (W).
        board: name used in labels.
        proc_root: root containing ``proc/stat`` (default "/").

    Raises:
        SensorUnavailable: neither /proc/stat nor psutil is available.
    """

    estimated = True

    def __init__(self, idle_w: float, active_w: float, board: str = "board", proc_root: str = "/"):
        self.idle_w = float(idle_w)
        self.active_w = float(active_w)
        self.board = board
        self.stat_path = os.path.join(proc_root, "proc/stat")
        self._prev: Optional[Tuple[float, float]] = None
        self._last_util = 0.0
        self._psutil = None
        if not os.path.exists(self.stat_path):
            try:
                import psutil  # optional
            except ImportError:
                raise SensorUnavailable("no %s and psutil is not installed: cannot estimate CPU load" % self.stat_path)
            self._psutil = psutil
            psutil.cpu_percent(interval=None)
        self.source = "estimate:%s" % board
        self.description = ("ESTIMATED from board profile %s (idle %.2f W, active %.2f W) x CPU utilisation (%s); "
                            "not a measurement" % (board, self.idle_w, self.active_w,
                                                    "psutil" if self._psutil else "/proc/stat"))

    @staticmethod
    def parse_proc_stat(text: str) -> Tuple[float, float]:
        """(busy jiffies, total jiffies) from the aggregate ``cpu`` line of /proc/stat.

        busy = user + nice + system + irq + softirq; total = busy + idle + iowait. Steal time (a VM's
        vCPU waiting for the hypervisor) and guest time (already inside user/nice) are left out."""
        for line in text.splitlines():
            parts = line.split()
            if parts and parts[0] == "cpu":
                vals = [float(v) for v in parts[1:8]]  # user nice system idle iowait irq softirq
                vals += [0.0] * (7 - len(vals))
                total = sum(vals)
                idle = vals[3] + vals[4]
                return total - idle, total
        raise ValueError("no aggregate 'cpu' line in /proc/stat")

    def utilisation(self) -> float:
        """CPU utilisation in [0, 1] since the previous call."""
        if self._psutil is not None:
            return max(0.0, min(1.0, self._psutil.cpu_percent(interval=None) / 100.0))
        try:
            busy, total = self.parse_proc_stat(_read_text(self.stat_path))
        except (OSError, ValueError) as exc:
            raise SensorUnavailable("cannot read %s: %s" % (self.stat_path, exc))
        if self._prev is None:
            util = busy / total if total > 0 else 0.0
        else:
            db, dt = busy - self._prev[0], total - self._prev[1]
            util = db / dt if dt > 0 else self._last_util
        self._prev = (busy, total)
        util = max(0.0, min(1.0, util))
        self._last_util = util
        return util

    def read(self) -> float:
        return self.idle_w + (self.active_w - self.idle_w) * self.utilisation()


# ============================================================================ meters
class EnergyMeter(object):
    """Interface: ``start()``, ``stop() -> EnergyReading``, context manager (result in ``.reading``).

    Attributes:
        idle_w: idle power (W) used for the net figure, or None.
        idle_source: "measured" / "profile" / "given" / None.
        estimated: True when readings are model estimates.
        source: sensor id.
    """

    estimated = False
    source = ""

    def __init__(self, idle_w: Optional[float] = None, idle_source: Optional[str] = None, note: str = ""):
        self.idle_w = None if idle_w is None else float(idle_w)
        self.idle_source = idle_source if idle_w is not None else None
        self.note = note
        self.reading: Optional[EnergyReading] = None

    def start(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def stop(self) -> EnergyReading:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self) -> "EnergyMeter":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.reading = self.stop()

    def measure_idle(self, seconds: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> float:
        """Measure idle power over ``seconds`` (do nothing else meanwhile); sets ``idle_w`` with
        idle_source "measured" and returns it (W)."""
        self.start()
        sleep(seconds)
        r = self.stop()
        self.idle_w = r.mean_w
        self.idle_source = "measured"
        return self.idle_w

    def _finish(self, joules: float, duration_s: float, samples: int, description: str) -> EnergyReading:
        mean_w = joules / duration_s if duration_s > 0 else 0.0
        net = None if self.idle_w is None else joules - self.idle_w * duration_s
        label = "%s%s: %.3f J over %.3f s (mean %.3f W, %d samples)%s" % (
            "" if self.estimated else "measured ", description, joules, duration_s, mean_w, samples,
            "" if net is None else "; net of idle %.3f W (%s): %.3f J" % (self.idle_w, self.idle_source, net))
        if self.note:
            label += " [%s]" % self.note
        return EnergyReading(joules=joules, mean_w=mean_w, duration_s=duration_s, samples=samples, source=self.source,
                             estimated=self.estimated, label=label, idle_w=self.idle_w, idle_source=self.idle_source,
                             net_joules=net)


class SampledEnergyMeter(EnergyMeter):
    """Samples a sensor in a background thread and integrates.

    Args:
        sensor: an Ina3221Sensor / PmicSensor / RaplSensor / EstimateSensor (or any object with
            ``read()``, ``cumulative``, ``estimated``, ``source``, ``description``).
        hz: sampling rate (>= 10 Hz; default 20).
        idle_w, idle_source: idle power for the net figure (W) and where it came from.
        clock: monotonic clock in s (default time.monotonic).
        note: appended to labels (e.g. why a fallback was chosen).

    Raises:
        ValueError: hz < 10.
    """

    def __init__(self, sensor: _Sensor, hz: float = 20.0, idle_w: Optional[float] = None,
                 idle_source: Optional[str] = None, clock: Callable[[], float] = time.monotonic, note: str = ""):
        super().__init__(idle_w, idle_source, note)
        if hz < MIN_HZ:
            raise ValueError("sampling rate must be >= %.0f Hz, got %r" % (MIN_HZ, hz))
        self.sensor = sensor
        self.hz = float(hz)
        self.clock = clock
        self.estimated = bool(getattr(sensor, "estimated", False))
        self.source = getattr(sensor, "source", type(sensor).__name__)
        self._samples: List[Tuple[float, float]] = []
        self._errors = 0
        self._thread: Optional[threading.Thread] = None
        self._stop_evt = threading.Event()
        self._lock = threading.Lock()

    def _take(self) -> None:
        try:
            value = self.sensor.read()
        except EnergyError:
            self._errors += 1
            return
        t = self.clock()
        with self._lock:
            self._samples.append((t, value))

    def _loop(self) -> None:
        period = 1.0 / self.hz
        next_t = time.monotonic() + period
        while not self._stop_evt.wait(max(0.0, next_t - time.monotonic())):
            self._take()
            next_t += period
            now = time.monotonic()
            if next_t < now:  # fell behind (slow sensor): do not burst
                next_t = now + period

    def start(self) -> None:
        """Take a first sample and start the sampling thread.

        Raises:
            EnergyError: already started.
        """
        if self._thread is not None:
            raise EnergyError("meter already started")
        self._samples = []
        self._errors = 0
        self._stop_evt.clear()
        self._take()
        self._thread = threading.Thread(target=self._loop, name="eetool-energy", daemon=True)
        self._thread.start()

    def stop(self) -> EnergyReading:
        """Stop sampling, take a last sample and integrate.

        Raises:
            EnergyError: not started, or fewer than two successful samples.
        """
        if self._thread is None:
            raise EnergyError("meter not started")
        self._stop_evt.set()
        self._thread.join()
        self._thread = None
        self._take()
        with self._lock:
            samples = sorted(self._samples)
        if len(samples) < 2:
            raise EnergyError("only %d readable samples (%d read errors) from %s" % (len(samples), self._errors, self.source))
        ts = [s[0] for s in samples]
        vs = [s[1] for s in samples]
        duration = ts[-1] - ts[0]
        if getattr(self.sensor, "cumulative", False):
            joules = vs[-1] - vs[0]
        else:
            joules = integrate_trapezoid(ts, vs)
        desc = getattr(self.sensor, "description", self.source)
        desc = "%s at %.0f Hz" % (desc, self.hz)
        self.reading = self._finish(joules, duration, len(samples), desc)
        self.reading.rails = getattr(self.sensor, "rails", None)
        self.reading.rails_skipped = getattr(self.sensor, "skipped", None) or None
        return self.reading


class CsvEnergyMeter(EnergyMeter):
    """Energy from a CSV log written by an external USB power meter.

    The file has rows ``timestamp,watts`` (Unix time in s, W); a header naming the columns is
    optional (recognised names: timestamp/time/t and watts/power_w/power/w, or volts + amps
    columns whose product is used). ``start()``/``stop()`` note the wall-clock window, and
    ``stop()`` integrates the log over it (trapezoid, with linear interpolation at both ends).

    Args:
        path: CSV file (may still be growing while measuring).
        clock: wall clock in s comparable with the log's timestamps (default time.time).
        idle_w, idle_source: as for :class:`EnergyMeter`.
        settle_s: seconds ``stop()`` waits for the logger to flush rows past the window end.
        sleep: sleep function (s).

    Raises (at stop):
        EnergyError: the log has fewer than two rows bracketing / inside the window.
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.time, idle_w: Optional[float] = None,
                 idle_source: Optional[str] = None, settle_s: float = 0.0, sleep: Callable[[float], None] = time.sleep,
                 note: str = ""):
        super().__init__(idle_w, idle_source, note)
        self.path = path
        self.clock = clock
        self.settle_s = float(settle_s)
        self._sleep = sleep
        self._t0: Optional[float] = None
        self.source = "csv:%s" % os.path.basename(path)

    def start(self) -> None:
        self._t0 = self.clock()

    def stop(self) -> EnergyReading:
        if self._t0 is None:
            raise EnergyError("meter not started")
        t1 = self.clock()
        if self.settle_s > 0:
            self._sleep(self.settle_s)
        t0, self._t0 = self._t0, None
        joules, n = self.integrate(t0, t1)
        self.reading = self._finish(joules, t1 - t0, n, "external USB meter log %s" % self.path)
        return self.reading

    def rows(self) -> List[Tuple[float, float]]:
        """All (timestamp s, W) rows of the log, sorted by time; malformed rows are skipped."""
        out: List[Tuple[float, float]] = []
        try:
            fh = open(self.path, "r", newline="")
        except OSError as exc:
            raise EnergyError("cannot open power log %s: %s" % (self.path, exc))
        with fh:
            reader = csv.reader(fh)
            t_i, w_i, v_i, a_i = 0, 1, None, None
            for row in reader:
                if not row or row[0].lstrip().startswith("#"):
                    continue
                cells = [c.strip() for c in row]
                try:
                    t = float(cells[t_i])
                    if v_i is not None and a_i is not None:
                        w = float(cells[v_i]) * float(cells[a_i])
                    else:
                        w = float(cells[w_i])
                except (ValueError, IndexError):
                    lower = [c.lower() for c in cells]
                    if any(c in ("timestamp", "time", "t", "unix_time") for c in lower):  # header row
                        t_i = next(i for i, c in enumerate(lower) if c in ("timestamp", "time", "t", "unix_time"))
                        w_cols = [i for i, c in enumerate(lower) if c in ("watts", "power_w", "power", "w")]
                        if w_cols:
                            w_i = w_cols[0]
                        else:
                            v_cols = [i for i, c in enumerate(lower) if c in ("volts", "voltage", "v")]
                            a_cols = [i for i, c in enumerate(lower) if c in ("amps", "current", "a")]
                            if v_cols and a_cols:
                                v_i, a_i = v_cols[0], a_cols[0]
                    continue
                out.append((t, w))
        out.sort()
        return out

    def integrate(self, t0: float, t1: float) -> Tuple[float, int]:
        """Energy (J) of the log between wall times ``t0`` and ``t1`` (s) and the number of rows used.

        Raises:
            EnergyError: fewer than two rows that bracket or fall in the window.
        """
        rows = self.rows()

        def at(t: float) -> Optional[float]:
            for i in range(1, len(rows)):
                (ta, wa), (tb, wb) = rows[i - 1], rows[i]
                if ta <= t <= tb:
                    return wa if tb == ta else wa + (wb - wa) * (t - ta) / (tb - ta)
            return None

        inside = [(t, w) for t, w in rows if t0 < t < t1]
        w0, w1 = at(t0), at(t1)
        pts = ([(t0, w0)] if w0 is not None else []) + inside + ([(t1, w1)] if w1 is not None else [])
        if len(pts) < 2:
            raise EnergyError("power log %s has %d usable rows in [%.3f, %.3f] (log spans %s)" % (
                self.path, len(pts), t0, t1,
                "%.3f..%.3f" % (rows[0][0], rows[-1][0]) if rows else "nothing"))
        return integrate_trapezoid([p[0] for p in pts], [p[1] for p in pts]), len(inside)


# ============================================================================ factory
def meter_for_board(profile: Dict[str, Any], **overrides: Any) -> EnergyMeter:
    """Pick the energy meter for a board profile, falling back to a labelled estimate.

    Args:
        profile: a board profile (runtime.boards.load_board).
        **overrides:
            sensor: force "ina3221", "pmic", "rapl", "csv", "estimate" (default: profile["energy_sensor"]).
            csv_path: USB-meter log; implies sensor "csv".
            root: filesystem root for sysfs lookups (default "/").
            proc_root: root for /proc/stat (default "/").
            vcgencmd: vcgencmd executable (default "vcgencmd").
            rail: INA3221 rail selection ("auto", "sum" or a name).
            rails: rail names to sum (INA3221 or PMIC; ``--energy-rails``, see :func:`parse_rails`); a
                sensor that has no rails, or rails it cannot read, raise instead of falling back to an
                estimate, since the user asked for those rails.
            hz: sampling rate (default 20, >= 10).
            idle_w: idle power measured beforehand (W); default: the profile's power.idle_w.
            clock: clock override for the meter.

    Returns:
        An :class:`EnergyMeter`; ``meter.estimated`` tells whether it measures or estimates, and
        ``meter.note`` says why a fallback happened.

    Raises:
        ValueError: unknown sensor kind or unknown override; ``rails`` for a sensor without rails.
        SensorUnavailable: sensor "estimate" impossible (no /proc/stat and no psutil); ``rails`` asked for
            that the sensor does not have or cannot read.
    """
    known = {"sensor", "csv_path", "root", "proc_root", "vcgencmd", "rail", "rails", "hz", "idle_w", "clock"}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError("unknown meter_for_board options %s; known: %s" % (sorted(unknown), sorted(known)))
    name = str(profile.get("name", "board"))
    power = profile.get("power") or {}
    kind = overrides.get("sensor") or ("csv" if overrides.get("csv_path") else profile.get("energy_sensor", "none"))
    hz = float(overrides.get("hz", 20.0))
    if overrides.get("idle_w") is not None:
        idle_w, idle_src = float(overrides["idle_w"]), "given"
    elif power.get("idle_w") is not None:
        idle_w, idle_src = float(power["idle_w"]), "profile"
    else:
        idle_w, idle_src = None, None
    root = overrides.get("root", "/")
    kw: Dict[str, Any] = {}
    if "clock" in overrides:
        kw["clock"] = overrides["clock"]

    rails = overrides.get("rails")
    if rails and kind not in ("ina3221", "pmic"):
        raise ValueError("--energy-rails %s: board %s's energy source is %r, which has no rails to choose "
                         "(rails exist on the Jetson INA3221 and the Raspberry Pi 5 PMIC)" % (",".join(rails), name, kind))
    if kind == "csv":
        if not overrides.get("csv_path"):
            raise ValueError("sensor 'csv' needs csv_path")
        return CsvEnergyMeter(overrides["csv_path"], idle_w=idle_w, idle_source=idle_src, **kw)
    reason = ""
    sensor: Optional[_Sensor] = None
    try:
        if kind == "ina3221":
            sensor = Ina3221Sensor(root=root, rail=rails or overrides.get("rail", "auto"))
        elif kind == "pmic":
            sensor = PmicSensor(vcgencmd=overrides.get("vcgencmd", "vcgencmd"), rails=rails)
        elif kind == "rapl":
            sensor = RaplSensor(root=root)
        elif kind in ("none", "estimate"):
            reason = "board %s has no power sensor" % name if kind == "none" else "estimate requested"
        else:
            raise ValueError("unknown energy sensor kind %r (known: ina3221, pmic, rapl, csv, estimate, none)" % kind)
    except SensorUnavailable as exc:
        if rails:  # the user chose rails: an estimate would not be what was asked for
            raise
        reason = "%s sensor unavailable: %s" % (kind, exc)
    if sensor is not None:
        return SampledEnergyMeter(sensor, hz=hz, idle_w=idle_w, idle_source=idle_src, **kw)
    if power.get("idle_w") is None or power.get("active_w") is None:
        raise SensorUnavailable("%s, and profile %s has no power.idle_w / active_w to estimate from" % (reason, name))
    est = EstimateSensor(power["idle_w"], power["active_w"], board=name, proc_root=overrides.get("proc_root", "/"))
    return SampledEnergyMeter(est, hz=hz, idle_w=idle_w, idle_source=idle_src, note=reason, **kw)
