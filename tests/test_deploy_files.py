"""What can be checked of the container files without a Docker engine."""

from pathlib import Path

import yaml

from shared.config import SERVICES, Config

ROOT = Path(__file__).resolve().parents[1]


def test_compose_runs_every_service_on_its_default_port():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    defaults = Config()
    for service in SERVICES:
        spec = compose[service]
        assert spec["command"] == ["python", "-m", f"services.{service}"]
        assert (ROOT / "services" / service / "__main__.py").exists()
        port = defaults.port(service)
        assert spec["ports"] == [f"127.0.0.1:{port}:{port}"] and spec["environment"]["SERVICE_PORT"] == str(port)
        assert spec["environment"]["FASTSERVE_REDIS_URL"] == "redis://redis:6379/0"
    assert "shared.celery_app" in compose["worker"]["command"]


def test_dockerfile_runs_as_non_root_with_a_grpc_health_check():
    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    assert "USER fastserve" in text and "HEALTHCHECK" in text and "fastserve health" in text
    for copied in ("pyproject.toml", "proto", "shared", "services"):
        assert (ROOT / copied).exists()
