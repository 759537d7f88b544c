"""Where an app's replicas answer themselves (Ray Serve's direct ingress), for clients that skip
the proxy hop.

With ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` in the environment where Ray starts, every replica of
the app serves its HTTP routes and its gRPC service on ports of its own (HTTP from 30000, gRPC
from 40000), beside Serve's proxies. (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` turns it on too, but
also sends handle calls over gRPC capped at 4 MiB a message, which refuses large sequences
unless ``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH`` is raised.)
Serve's REST API lists them as the app's target groups; ``replica_targets`` reads them.

    python -m deploy.targets                       # every replica of app fa3trt, HTTP and gRPC
    python -m deploy.targets --protocol gRPC --host 127.0.0.1
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

import requests

__all__ = ["replica_targets", "ray_auth_token", "direct_ingress_enabled", "PROTOCOLS"]

PROTOCOLS = ("HTTP", "gRPC")
Protocol = Literal["HTTP", "gRPC"]


def direct_ingress_enabled() -> bool:
    """Whether Serve in this process's cluster runs direct ingress, as Serve itself decides it from
    the environment (``RAY_SERVE_ENABLE_DIRECT_INGRESS``, or a setting that implies it)."""
    try:
        from ray.serve._private import constants
    except ImportError:  # a Serve without the setting
        return False
    return bool(getattr(constants, "RAY_SERVE_ENABLE_DIRECT_INGRESS", False))


def ray_auth_token() -> str | None:
    """The Ray cluster's auth token as Ray's own clients find it (env, token file), or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def replica_targets(
    dashboard: str = "http://127.0.0.1:8265",
    app: str = "fa3trt",
    protocol: Protocol = "HTTP",
    host: str | None = None,
    token: str | None = None,
) -> list[str]:
    """The addresses of ``app``'s replicas that serve ``protocol`` themselves: base URLs
    (``http://ip:port/prefix``) for HTTP, ``ip:port`` for gRPC (a tritonclient's ``url``).
    ``host`` replaces each listed node IP (``127.0.0.1`` when ``http_options.host`` binds the
    loopback only). Raises ``RuntimeError`` naming the switch when there are none."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    token = token or ray_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = requests.get(f"{dashboard}/api/serve/applications/", headers=headers, timeout=30)
    r.raise_for_status()
    out = []
    for group in r.json().get("target_groups") or []:
        # Proxy target groups name no ingress deployment; direct-ingress ones name the app's.
        if (
            group.get("app_name") != app
            or group.get("protocol") != protocol
            or not group.get("ingress_deployment_name")
        ):
            continue
        prefix = str(group.get("route_prefix") or "/").rstrip("/")
        for t in group.get("targets") or []:
            where = f"{host or t['ip']}:{t['port']}"
            out.append(f"http://{where}{prefix}" if protocol == "HTTP" else where)
    if not out:
        raise RuntimeError(
            f"Serve at {dashboard} lists no direct-ingress {protocol} targets for app {app!r}: start Ray with "
            "RAY_SERVE_ENABLE_DIRECT_INGRESS=1, or call Serve's proxy"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dashboard", default="http://127.0.0.1:8265", help="the Ray dashboard (Serve's REST API)")
    p.add_argument("--app", default="fa3trt", help="the Serve application's name")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None, help="one protocol (default: both)")
    p.add_argument("--host", default=None, help="print this host instead of each listed node IP")
    args = p.parse_args()
    protocols: tuple[Protocol, ...] = (args.protocol,) if args.protocol else ("HTTP", "gRPC")
    for proto in protocols:
        try:
            for t in replica_targets(args.dashboard, args.app, proto, args.host):
                print(f"{proto:5s} {t}")
        except RuntimeError as e:
            raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
