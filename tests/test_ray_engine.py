"""serve --engine ray on a local Ray instance with 2 replicas: devices speak the same protocol, every reply
is checked against the tail run here, and killing one replica during the load loses no request (each gets
a reply or an error reply; the client's retry-once path resends a replica_lost one). One test, bounded:
it starts the local Ray instance through serve itself and kills only the replica actor it names."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from runtime.bundle import Bundle
from runtime.client import EdgeClient, ServerError, ServerUnavailable
from runtime.loadtest import TOLERANCE, prepare_requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KILL_ONE_REPLICA = r"""
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "TailDeployment" in a["name"]]
victim = sorted(a["name"] for a in names)[0]
ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
print(json.dumps({"replicas": len(names), "killed": victim}))
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["RAY_AUTH_MODE"] = "disabled"  # loopback-only test instance; a second driver joins it to kill a replica
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on 127.0.0.1 only (what serve --ray-address local sets)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def test_ray_serve_two_replicas_and_a_killed_replica(effnet_bundle, tmp_path):
    bundle_dir = str(effnet_bundle[0])
    req = prepare_requests(Bundle.load(bundle_dir), "onnx", "fp32", limit=6, threads=1)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", bundle_dir, "--engine", "ray", "--replicas", "2",
                             "--precision", "fp32", "--threads", "1", "--max-batch", "4", "--port", "0",
                             "--ray-address", "local"],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=_env(), cwd=REPO)
    try:
        addr = plan = None
        deadline = time.monotonic() + 300
        while plan is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("eetool server:"):
                addr = line.strip().rsplit(" on ", 1)[1]
            elif line.startswith("plan "):
                plan = json.loads(line[5:])
        assert addr and plan, (tmp_path / "serve.log").read_text()[-3000:]
        assert plan["engine"] == "ray" and plan["replicas"] == 2
        host, port = addr.rsplit(":", 1)

        stats = {"ok": 0, "wrong": 0, "lost": 0, "errors": {}, "after_kill_ok": 0, "retries": 0}
        lock = threading.Lock()
        killed = threading.Event()
        stop = threading.Event()

        t_end = time.monotonic() + 400

        def client(c):
            with EdgeClient(host, int(port), timeout_s=60.0) as cli:
                for i in range(400):  # bounded in count and in time
                    if stop.is_set() or time.monotonic() > t_end:
                        break
                    k = (c + i) % len(req["tensors"])
                    try:
                        r = cli.infer(req["tensors"][k], req["quant"])
                    except ServerError as exc:
                        with lock:
                            stats["errors"][exc.code] = stats["errors"].get(exc.code, 0) + 1
                        continue
                    except ServerUnavailable:
                        with lock:
                            stats["lost"] += 1
                        continue
                    ref = req["reference"][k]
                    good = int(r.logits.argmax()) == int(ref.argmax()) and \
                        float(np.abs(r.logits - ref).max()) <= TOLERANCE * (1 + float(np.abs(ref).max()))
                    with lock:
                        stats["ok" if good else "wrong"] += 1
                        stats["after_kill_ok"] += int(good and killed.is_set())
                with lock:
                    stats["retries"] += cli.retries

        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while stats["ok"] < 12 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stats["ok"] >= 12, (stats, (tmp_path / "serve.log").read_text()[-3000:])
        assert plan["ray_address"].startswith("127.0.0.1:")
        out = subprocess.run([sys.executable, "-c", KILL_ONE_REPLICA, plan["ray_address"]], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, timeout=120, env=_env())
        assert out.returncode == 0, out.stderr[-3000:]
        kill = json.loads(out.stdout.strip().splitlines()[-1])
        assert kill["replicas"] == 2
        killed.set()
        deadline = time.monotonic() + 120
        while stats["after_kill_ok"] < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        # every request answered, every answer right; the only errors a device may see are replica_lost
        assert stats["lost"] == 0 and stats["wrong"] == 0, stats
        assert set(stats["errors"]) <= {"replica_lost"}, stats
        assert stats["after_kill_ok"] >= 20, stats  # the surviving replica (and the restarted one) serve on
    finally:
        stop.set() if "stop" in locals() else None
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
