"""A real local Ray cluster with `serve run` on free ports, that stops only its own processes.

Unlike ``cluster.serve_cluster`` (fixed ports, ``ray stop --force``), it can run beside another
Ray cluster on the same machine: the head runs as ``ray start --head --block`` on ports of its
own, ``serve run`` gets a copy of serve_config.yaml with its own HTTP and gRPC ports, and the
teardown ends those two processes (the blocking head stops its own Ray processes).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from tests.deploy.cluster import ROOT


@dataclass
class Cluster:
    http: str
    """http://127.0.0.1:PORT"""
    grpc: str
    """127.0.0.1:PORT"""
    env: dict[str, str]
    dashboard: str = ""
    """http://127.0.0.1:PORT (Serve's REST API: the direct-ingress targets)"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop(proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextmanager
def isolated_serve_cluster(
    log_dir: Path, args: dict[str, Any] | None = None, num_cpus: int = 2, extra_env: dict[str, str] | None = None
) -> Iterator[Cluster]:
    """serve_config.yaml (its app ``args`` updated with ``args``) on a cluster of its own."""
    gcs, client, dash, agent, agent_grpc, runtime_env, metrics, http, grpc_port = free_ports(9)
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = http
    config["grpc_options"]["port"] = grpc_port
    config["applications"][0]["args"].update(args or {})
    config_path = log_dir / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = dict(
        os.environ,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        **(extra_env or {}),
    )
    head_cmd = [
        shutil.which("ray") or "ray",
        "start",
        "--head",
        "--block",
        f"--num-cpus={num_cpus}",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--ray-client-server-port={client}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        "--disable-usage-stats",
    ]
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    url = f"http://127.0.0.1:{http}"
    with open(log_dir / "ray.log", "w") as ray_log, open(log_dir / "serve.log", "w") as serve_log:
        head = subprocess.Popen(
            head_cmd, cwd=ROOT, env=env, stdout=ray_log, stderr=subprocess.STDOUT, start_new_session=True
        )
        serve = None
        try:
            time.sleep(3)
            serve = subprocess.Popen(
                [shutil.which("serve") or "serve", "run", str(config_path)],
                cwd=ROOT,
                env=env,
                stdout=serve_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            t0 = time.time()
            while True:
                if serve.poll() is not None or head.poll() is not None or time.time() - t0 > 300:
                    serve_log.flush()
                    tail = (log_dir / "serve.log").read_text(errors="replace")[-6000:]
                    raise RuntimeError(f"the app did not become ready; serve run log tail:\n{tail}")
                try:
                    if requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(1)
            yield Cluster(url, f"127.0.0.1:{grpc_port}", env, f"http://127.0.0.1:{dash}")
        finally:
            if serve is not None:
                _stop(serve, 30)
            _stop(head)
