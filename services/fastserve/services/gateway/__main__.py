"""`python -m fastserve.services.gateway`: serve the OpenAI-compatible HTTP API until SIGTERM."""

from __future__ import annotations

import tempfile
from pathlib import Path

import uvicorn

from fastserve.runtime.config import Config
from fastserve.runtime.logs import setup_logging
from fastserve.services.gateway.app import create_app
from fastserve.services.gateway.request_ids import GatewayClient

SERVICE = "gateway"


def main() -> None:
    config = Config.from_env()
    setup_logging(SERVICE, config.log_format, config.log_level)
    tls = config.server_tls()
    # Each service at its own host when it has one (containers), else at FASTSERVE_HOST.
    client = GatewayClient.from_settings(config.client_settings(), hosts=config.service_hosts())
    port = config.metrics_port("inference")
    metrics_url = f"http://{client.targets['inference'].rpartition(':')[0]}:{port}/metrics" if port else ""
    app = create_app(client, config.auth_token, inference_metrics_url=metrics_url)
    options = {}
    with tempfile.TemporaryDirectory(prefix="fastserve-gateway-") as scratch:
        if tls is not None:
            # uvicorn reads files; server_tls has read them all or refused, so the key is the one checked.
            key, cert = Path(scratch) / "key.pem", Path(scratch) / "cert.pem"
            key.touch(mode=0o600)
            key.write_bytes(tls[0])
            cert.write_bytes(tls[1])
            options = {"ssl_keyfile": str(key), "ssl_certfile": str(cert)}
        try:
            # uvicorn handles SIGTERM: it stops accepting, lets running requests finish, then returns.
            uvicorn.run(app, host=config.host, port=config.gateway_port, log_config=None, access_log=False,
                        timeout_graceful_shutdown=max(1, int(config.grace_seconds)), **options)
        finally:
            client.close()


if __name__ == "__main__":
    main()
