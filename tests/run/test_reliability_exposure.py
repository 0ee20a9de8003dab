"""The local Ray cluster a run starts refuses a client without its auth token (Ray's servers listen on every
interface, so the token is what keeps other users of the host out). Slow: a cluster start and a refused connect."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_HEAD = """
import sys, ray
from opd_agents.config import RayConfig
from opd_agents.run.cluster import init_ray
init_ray(RayConfig(num_cpus=1))
print("GCS", ray._private.worker.global_worker.node.gcs_address, flush=True)
sys.stdin.readline()  # until the test closes stdin; then ray shuts the cluster down at exit
ray.shutdown()
"""

_CLIENT = """
import sys, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    ray.get(ray.put(1), timeout=60)
except Exception as exc:  # refused: ConnectionError / AuthenticationError, by the client or by the server
    print("REFUSED", type(exc).__name__, flush=True)
else:
    print("CONNECTED", flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_cluster_refuses_a_client_without_the_token(tmp_path: Path) -> None:
    head = subprocess.Popen([sys.executable, "-c", _HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        line = ""
        while not line.startswith("GCS"):
            line = head.stdout.readline()
            assert line or head.poll() is None, "the head process ended before printing its address"
        address = line.split()[1]
        stranger = {**os.environ, "HOME": str(tmp_path)}  # no ~/.ray/auth_token here
        for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            stranger.pop(key, None)
        # Without a token (Ray's client gives up itself), and with a wrong one (the cluster's servers refuse it).
        for env, by_server in ((stranger, False), ({**stranger, "RAY_AUTH_TOKEN": "0" * 64}, True)):
            client = subprocess.run([sys.executable, "-c", _CLIENT, address], env=env, capture_output=True,
                                    text=True, timeout=180, cwd=ROOT)
            assert "REFUSED" in client.stdout, client.stdout + client.stderr[-2000:]
            assert not by_server or "InvalidAuthToken" in client.stderr, client.stderr[-2000:]
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
