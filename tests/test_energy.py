"""runtime.energy against fake sysfs trees, a fake `vcgencmd` executable, a fake RAPL counter with
wraparound, a CSV USB-meter log and a fake /proc/stat. Sampling runs for a fraction of a second;
no assertion depends on wall-clock time (energies are checked against mean power x the meter's
own measured duration)."""
import os
import stat
import time

import pytest

from runtime import energy as E
from runtime.boards import load_board


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(str(text) + "\n")
    os.replace(tmp, path)  # atomic: the sampling thread never sees a half-written file


def run_meter(meter, seconds=0.15):
    with meter:
        time.sleep(seconds)
    return meter.reading


# ------------------------------------------------------------------ INA3221
def nano_tree(root):
    dev = os.path.join(root, "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0")
    for n, (name, mw) in enumerate([("POM_5V_IN", 2500), ("POM_5V_GPU", 300), ("POM_5V_CPU", 800)]):
        write(os.path.join(dev, "rail_name_%d" % n), name)
        write(os.path.join(dev, "in_power%d_input" % n), mw)
        write(os.path.join(dev, "in_current%d_input" % n), mw // 5)
        write(os.path.join(dev, "in_voltage%d_input" % n), 5000)
    return dev


def orin_tree(root, with_vdd_in=True):
    dev = os.path.join(root, "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3")
    rails = [("VDD_IN", 5000, 1000), ("VDD_CPU_GPU_CV", 5000, 200), ("VDD_SOC", 5000, 300)]
    if not with_vdd_in:
        rails[0] = ("VIN_SYS_5V0", 5000, 400)
    for n, (name, mv, ma) in enumerate(rails, start=1):
        write(os.path.join(dev, "in%d_label" % n), name)
        write(os.path.join(dev, "in%d_input" % n), mv)
        write(os.path.join(dev, "curr%d_input" % n), ma)
    write(os.path.join(dev, "in7_label"), "sum of shunt voltages")  # no curr7: ignored
    write(os.path.join(dev, "in7_input"), 12)
    write(os.path.join(dev, "name"), "ina3221")
    return dev


def test_ina3221_nano_iio(tmp_path):
    root = str(tmp_path)
    nano_tree(root)
    s = E.Ina3221Sensor(root=root)
    assert s.selected == ["POM_5V_IN"] and s.read() == pytest.approx(2.5)
    assert E.Ina3221Sensor(root=root, rail="sum").read() == pytest.approx(3.6)
    assert E.Ina3221Sensor(root=root, rail="POM_5V_CPU").read() == pytest.approx(0.8)
    with pytest.raises(E.SensorUnavailable, match="POM_5V_IN"):
        E.Ina3221Sensor(root=root, rail="VDD_NOPE")
    meter = E.meter_for_board(load_board("jetson-nano"), root=root, hz=50)
    r = run_meter(meter)
    assert not r.estimated and r.source == "ina3221:POM_5V_IN" and r.samples >= 2
    assert r.mean_w == pytest.approx(2.5) and r.joules == pytest.approx(2.5 * r.duration_s)
    assert r.idle_w == 2.0 and r.idle_source == "profile"
    assert r.net_joules == pytest.approx(0.5 * r.duration_s)
    assert r.label.startswith("measured ")


def test_ina3221_orin_hwmon(tmp_path):
    root = str(tmp_path)
    dev = orin_tree(root)
    s = E.Ina3221Sensor(root=root)
    assert s.selected == ["VDD_IN"] and s.read() == pytest.approx(5.0)
    assert [n for n, _ in s.channels] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    meter = E.meter_for_board(load_board("jetson-orin-nano"), root=root, hz=40, idle_w=4.0)
    with meter:
        time.sleep(0.05)
        write(os.path.join(dev, "curr1_input"), 2000)  # load step: 10 W
        time.sleep(0.1)
    r = meter.reading
    assert 5.0 <= r.mean_w <= 10.0 and r.idle_source == "given"
    assert r.joules == pytest.approx(r.mean_w * r.duration_s)


def test_ina3221_without_total_rail_sums(tmp_path):
    orin_tree(str(tmp_path), with_vdd_in=False)
    s = E.Ina3221Sensor(root=str(tmp_path))
    assert s.read() == pytest.approx(2.0 + 1.0 + 1.5)
    assert "+" in s.source


def agx_orin_tree(root):
    """Jetson AGX Orin: two INA3221 monitors via hwmon. 1-0040 carries VDD_GPU_SOC, VDD_CPU_CV and
    VIN_SYS_5V0; on 1-0041 only channel 2 (VDDQ_VDD2_1V8AO) is connected: channel 1 has no label and
    channel 3 is labelled but both fail to read (a directory stands in for the EIO of a disabled channel)."""
    a = os.path.join(root, "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1")
    for n, (name, mv, ma) in enumerate([("VDD_GPU_SOC", 5000, 400), ("VDD_CPU_CV", 5000, 600),
                                        ("VIN_SYS_5V0", 5000, 500)], start=1):
        write(os.path.join(a, "in%d_label" % n), name)
        write(os.path.join(a, "in%d_input" % n), mv)
        write(os.path.join(a, "curr%d_input" % n), ma)
    b = os.path.join(root, "sys/bus/i2c/drivers/ina3221/1-0041/hwmon/hwmon2")
    write(os.path.join(b, "in2_label"), "VDDQ_VDD2_1V8AO")
    write(os.path.join(b, "in2_input"), 1800)
    write(os.path.join(b, "curr2_input"), 500)
    write(os.path.join(b, "in3_label"), "NC")
    for n in (1, 3):
        os.makedirs(os.path.join(b, "curr%d_input" % n))  # present, unreadable
        os.makedirs(os.path.join(b, "in%d_input" % n))
    return a, b


def test_ina3221_skips_unreadable_channels_and_names_them(tmp_path):
    root = str(tmp_path)
    agx_orin_tree(root)
    s = E.Ina3221Sensor(root=root)
    assert s.selected == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]  # no total rail: the sum
    assert sorted(s.skipped) == ["1-0041:ch1", "NC"] and "Errno" in s.skipped["NC"]
    assert s.read() == pytest.approx(2.0 + 3.0 + 2.5 + 0.9)
    meter = E.meter_for_board(load_board("jetson-agx-orin"), root=root, hz=50)
    r = run_meter(meter)
    assert not r.estimated and r.label.startswith("measured ") and "unreadable, left out: 1-0041:ch1, NC" in r.label
    assert r.mean_w == pytest.approx(8.4) and r.rails == s.selected
    assert sorted(r.rails_skipped) == ["1-0041:ch1", "NC"] and sorted(r.to_json()["rails_skipped"]) == ["1-0041:ch1", "NC"]


def test_energy_rails_choose_what_is_summed(tmp_path):
    root = str(tmp_path)
    agx_orin_tree(root)
    board = load_board("jetson-agx-orin")
    assert E.parse_rails("VDD_CPU_CV, VDD_GPU_SOC") == ["VDD_CPU_CV", "VDD_GPU_SOC"]
    assert E.parse_rails("auto") is None and E.parse_rails(None) is None and E.parse_rails("sum") == ["sum"]
    meter = E.meter_for_board(board, root=root, hz=50, rails=["VDD_CPU_CV", "VDD_GPU_SOC"])
    r = run_meter(meter)
    assert r.source == "ina3221:VDD_CPU_CV+VDD_GPU_SOC" and r.mean_w == pytest.approx(5.0)
    # rails asked for by name never fall back to an estimate: a clear error instead
    with pytest.raises(E.SensorUnavailable, match="NC .*present but unreadable; readable rails: VDD_GPU_SOC"):
        E.meter_for_board(board, root=root, rails=["NC"])
    with pytest.raises(E.SensorUnavailable, match="VDD_NOPE not found; rails: VDD_GPU_SOC"):
        E.meter_for_board(board, root=root, rails=["VDD_NOPE"])
    with pytest.raises(ValueError, match="has no rails to choose"):
        E.meter_for_board(load_board("rpi4"), rails=["VDD_IN"])


def test_ina3221_with_every_channel_unreadable_is_unavailable(tmp_path):
    b = os.path.join(str(tmp_path), "sys/bus/i2c/drivers/ina3221/1-0041/hwmon/hwmon2")
    for n in (1, 3):
        os.makedirs(os.path.join(b, "curr%d_input" % n))
        os.makedirs(os.path.join(b, "in%d_input" % n))
    with pytest.raises(E.SensorUnavailable, match="no readable INA3221 channel: 1-0041:ch1"):
        E.Ina3221Sensor(root=str(tmp_path))


def test_bench_energy_rails_refused_before_work_where_there_are_none():
    """--energy-rails on a board whose energy source has no rails: refused before the bundle is read."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "runtime", "bench", "/no/such/bundle", "--board", "host",
                           "--energy-rails", "VDD_IN"], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "--energy-rails VDD_IN" in err and "no rails to choose" in err


def test_pmic_rails_choose_what_is_summed(tmp_path):
    exe = fake_vcgencmd(tmp_path)
    s = E.PmicSensor(vcgencmd=exe, rails=["VDD_CORE"])
    assert s.read() == pytest.approx(2.0 * 0.8) and s.rails == ["VDD_CORE"]
    with pytest.raises(E.SensorUnavailable, match="PMIC rail VDD_GPU not found"):
        E.PmicSensor(vcgencmd=exe, rails=["VDD_GPU"])


def test_ina3221_absent_falls_back_to_labelled_estimate(tmp_path):
    proc = fake_proc(tmp_path)
    meter = E.meter_for_board(load_board("jetson-nano"), root=str(tmp_path), proc_root=proc)
    assert meter.estimated and "ina3221 sensor unavailable" in meter.note


# ------------------------------------------------------------------ Raspberry Pi 5 PMIC
PMIC_OUTPUT = """\
     3V7_WL_SW_A current(0)=0.00000000A
       3V3_SYS_A current(1)=0.05000000A
       1V8_SYS_A current(2)=0.20000000A
      DDR_VDD2_A current(3)=0.02000000A
      DDR_VDDQ_A current(4)=0.00000000A
       1V1_SYS_A current(5)=0.20000000A
       0V8_SW_A current(6)=0.30000000A
     VDD_CORE_A current(7)=2.00000000A
     3V7_WL_SW_V volt(8)=3.70000000V
       3V3_SYS_V volt(9)=3.30000000V
       1V8_SYS_V volt(10)=1.80000000V
      DDR_VDD2_V volt(11)=1.10000000V
      DDR_VDDQ_V volt(12)=0.60000000V
       1V1_SYS_V volt(13)=1.10000000V
       0V8_SW_V volt(14)=0.80000000V
     VDD_CORE_V volt(15)=0.80000000V
        EXT5V_V volt(24)=5.10000000V
         BATT_V volt(25)=0.00000000V
"""
PMIC_WATTS = 0.05 * 3.3 + 0.2 * 1.8 + 0.02 * 1.1 + 0.2 * 1.1 + 0.3 * 0.8 + 2.0 * 0.8


def fake_vcgencmd(tmp_path, ok=True):
    out = tmp_path / "pmic.txt"
    out.write_text(PMIC_OUTPUT)
    script = tmp_path / "vcgencmd"
    if ok:
        script.write_text('#!/bin/sh\nif [ "$1" = "pmic_read_adc" ]; then cat "%s"; exit 0; fi\n'
                          'echo "error=1 error_msg=\\"Command not registered\\"" ; exit 2\n' % out)
    else:  # what a Pi 4 prints: no PMIC ADC command
        script.write_text('#!/bin/sh\necho "error=1 error_msg=\\"Command not registered\\""\nexit 255\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_parse_pmic_adc():
    rails = E.parse_pmic_adc(PMIC_OUTPUT)
    assert "EXT5V" not in rails and "BATT" not in rails and len(rails) == 8
    assert rails["VDD_CORE"] == pytest.approx(1.6)
    assert sum(rails.values()) == pytest.approx(PMIC_WATTS)


def test_pmic_fake_vcgencmd(tmp_path):
    exe = fake_vcgencmd(tmp_path)
    assert E.PmicSensor(vcgencmd=exe).read() == pytest.approx(PMIC_WATTS)
    meter = E.meter_for_board(load_board("rpi5"), vcgencmd=exe, hz=10)
    r = run_meter(meter, 0.25)
    assert not r.estimated and r.source == "pmic" and r.samples >= 2
    assert r.mean_w == pytest.approx(PMIC_WATTS)


def test_pmic_failing_or_missing_vcgencmd_falls_back(tmp_path):
    proc = fake_proc(tmp_path)
    exe = fake_vcgencmd(tmp_path, ok=False)
    with pytest.raises(E.SensorUnavailable, match="exited"):
        E.PmicSensor(vcgencmd=exe)
    m = E.meter_for_board(load_board("rpi5"), vcgencmd=exe, proc_root=proc)
    assert m.estimated and "pmic sensor unavailable" in m.note
    m = E.meter_for_board(load_board("rpi5"), vcgencmd=str(tmp_path / "does-not-exist"), proc_root=proc)
    assert m.estimated


# ------------------------------------------------------------------ RAPL
MAX_RANGE = 262143328850


def rapl_tree(root, start_uj):
    base = os.path.join(root, "sys/class/powercap")
    z = os.path.join(base, "intel-rapl:0")
    write(os.path.join(z, "name"), "package-0")
    write(os.path.join(z, "energy_uj"), start_uj)
    write(os.path.join(z, "max_energy_range_uj"), MAX_RANGE)
    sub = os.path.join(base, "intel-rapl:0:0")  # core sub-zone: inside package, must not be added
    write(os.path.join(sub, "name"), "core")
    write(os.path.join(sub, "energy_uj"), 5)
    write(os.path.join(sub, "max_energy_range_uj"), MAX_RANGE)
    psys = os.path.join(base, "intel-rapl:1")  # platform zone: would double count with package
    write(os.path.join(psys, "name"), "psys")
    write(os.path.join(psys, "energy_uj"), 7)
    write(os.path.join(psys, "max_energy_range_uj"), MAX_RANGE)
    return z


def test_rapl_delta_wraparound():
    assert E.RaplSensor.delta_uj(100, 250, 1000) == 150
    assert E.RaplSensor.delta_uj(900, 50, 1000) == 150


def test_rapl_fake_counter_with_wraparound(tmp_path):
    root = str(tmp_path)
    start = MAX_RANGE - 1_000_000  # 1 J before the wrap
    z = rapl_tree(root, start)
    meter = E.meter_for_board(load_board("host"), root=root, hz=50)
    assert not meter.estimated and meter.source == "rapl:package-0"
    meter.start()
    time.sleep(0.05)
    write(os.path.join(z, "energy_uj"), 2_500_000)  # wrapped, +3.5 J in total
    time.sleep(0.05)
    r = meter.stop()
    assert r.joules == pytest.approx(3.5) and not r.estimated
    assert r.mean_w == pytest.approx(3.5 / r.duration_s)


def test_rapl_absent(tmp_path):
    with pytest.raises(E.SensorUnavailable, match="no RAPL zones"):
        E.RaplSensor(root=str(tmp_path))


def test_this_machine_host_profile_is_labelled_honestly():
    """On a VM without readable RAPL the host meter must be an estimate, labelled as such."""
    try:
        E.RaplSensor()
        rapl_ok = True
    except E.SensorUnavailable:
        rapl_ok = False
    meter = E.meter_for_board(load_board("host"))
    r = run_meter(meter, 0.12)
    assert r.estimated == (not rapl_ok)
    if not rapl_ok:
        assert r.label.startswith("ESTIMATED") and "rapl sensor unavailable" in r.label
        assert r.source == "estimate:host"


# ------------------------------------------------------------------ CSV USB meter log
def test_csv_meter(tmp_path):
    log = tmp_path / "usb.csv"
    rows = ["timestamp,watts"] + ["%.1f,%.3f" % (1000 + 0.5 * i, 2.0 + 0.1 * i) for i in range(21)]  # W = 2 + 0.2 (t-1000)
    log.write_text("\n".join(rows) + "\n")
    times = iter([1002.25, 1006.75])
    meter = E.meter_for_board(load_board("rpi4"), csv_path=str(log), clock=lambda: next(times))
    r = run_meter(meter, 0)
    # exact integral of the linear power curve over [2.25, 6.75]
    expected = (2.0 * 4.5) + 0.1 * (6.75 ** 2 - 2.25 ** 2)
    assert r.joules == pytest.approx(expected) and r.duration_s == pytest.approx(4.5)
    assert not r.estimated and r.source == "csv:usb.csv" and r.samples == 9
    assert r.net_joules == pytest.approx(expected - 2.7 * 4.5)


def test_csv_meter_volts_amps_and_headerless(tmp_path):
    va = tmp_path / "va.csv"
    va.write_text("# fnirsi export\ntime,volts,amps\n10,5.0,0.5\n11,5.0,0.5\nbad,row\n12,5.0,0.5\n")
    assert E.CsvEnergyMeter(str(va)).integrate(10.0, 12.0) == (pytest.approx(5.0), 1)
    plain = tmp_path / "plain.csv"
    plain.write_text("1,4\n2,4\n3,4\n")
    assert E.CsvEnergyMeter(str(plain)).integrate(1.5, 2.5)[0] == pytest.approx(4.0)
    with pytest.raises(E.EnergyError, match="usable rows"):
        E.CsvEnergyMeter(str(plain)).integrate(10.0, 20.0)
    with pytest.raises(E.EnergyError):
        E.CsvEnergyMeter(str(tmp_path / "missing.csv")).integrate(0, 1)


# ------------------------------------------------------------------ estimate
def fake_proc(tmp_path, busy=100, idle=300):
    root = str(tmp_path / "fakeproc")
    write(os.path.join(root, "proc/stat"),
          "cpu  %d 0 0 %d 0 0 0 0 0 0\ncpu0 %d 0 0 %d 0 0 0 0 0 0\nintr 1 2 3\n" % (busy, idle, busy, idle))
    return root


def test_estimate_sensor_from_proc_stat(tmp_path):
    root = fake_proc(tmp_path, busy=100, idle=300)
    s = E.EstimateSensor(2.0, 6.0, board="rpi4", proc_root=root)
    assert s.read() == pytest.approx(2.0 + 4.0 * 0.25)  # since-boot average 25 %
    write(os.path.join(root, "proc/stat"), "cpu  150 0 0 350 0 0 0 0 0 0\n")  # +50 busy, +50 idle
    assert s.read() == pytest.approx(4.0)
    write(os.path.join(root, "proc/stat"), "cpu  250 0 0 350 0 0 0 0 0 0\n")  # fully busy
    assert s.read() == pytest.approx(6.0)
    assert s.estimated and s.description.startswith("ESTIMATED")


def test_board_without_sensor_gets_labelled_estimate(tmp_path):
    root = fake_proc(tmp_path)
    meter = E.meter_for_board(load_board("rpi4"), proc_root=root, hz=20)
    r = run_meter(meter)
    assert r.estimated and r.label.startswith("ESTIMATED") and "no power sensor" in r.label
    assert r.source == "estimate:rpi4"
    assert 2.7 <= r.mean_w <= 6.4 and r.joules == pytest.approx(r.mean_w * r.duration_s)


# ------------------------------------------------------------------ meter mechanics
class ConstSensor(object):
    cumulative = False
    estimated = False
    source = "const"
    description = "constant"

    def __init__(self, w):
        self.w = w

    def read(self):
        return self.w


def test_integrate_trapezoid():
    assert E.integrate_trapezoid([0, 1, 2], [1, 3, 5]) == pytest.approx(6.0)
    assert E.integrate_trapezoid([0], [5]) == 0.0


def test_measure_idle_then_net(tmp_path):
    sensor = ConstSensor(3.0)
    m = E.SampledEnergyMeter(sensor, hz=50)
    assert m.measure_idle(0.05) == pytest.approx(3.0) and m.idle_source == "measured"
    sensor.w = 5.0
    r = run_meter(m, 0.08)
    assert r.net_joules == pytest.approx(2.0 * r.duration_s)
    assert "net of idle 3.000 W (measured)" in r.label


def test_meter_misuse():
    with pytest.raises(ValueError):
        E.SampledEnergyMeter(ConstSensor(1.0), hz=5)
    m = E.SampledEnergyMeter(ConstSensor(1.0))
    with pytest.raises(E.EnergyError):
        m.stop()
    m.start()
    with pytest.raises(E.EnergyError):
        m.start()
    m.stop()
    with pytest.raises(ValueError):
        E.meter_for_board(load_board("rpi4"), bogus=1)
    with pytest.raises(ValueError):
        E.meter_for_board(load_board("rpi4"), sensor="thermocouple")


def test_sampling_thread_reaches_rate():
    """>= 10 Hz: count samples of a deterministic fake clock-free sensor over a short window."""
    calls = []

    class Counting(ConstSensor):
        def read(self):
            calls.append(1)
            return 1.0

    m = E.SampledEnergyMeter(Counting(1.0), hz=20)
    m.start()
    deadline = time.monotonic() + 5.0
    while len(calls) < 5 and time.monotonic() < deadline:  # bounded wait, no timing assertion
        time.sleep(0.01)
    r = m.stop()
    assert r.samples >= 5
