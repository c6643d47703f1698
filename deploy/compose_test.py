"""make compose-test: the image and the compose stack, built and run for real with podman (docs/deploy.md).

1. Installs what is missing: Debian's podman, runc, debootstrap and podman-compose (apt-get).
2. Builds a base image from Debian's packages when it is missing (no public registry is needed):
   `debootstrap --variant=minbase` bookworm with python3, then `podman import`; and, from it, a Redis image
   from Debian's redis-server, which docker-compose.yml takes as REDIS_IMAGE.
3. Builds the FastServe image from deploy/docker/Dockerfile on that base. Wheels of COMPOSE_TEST_WHEELS
   (default /opt/wheels: this machine's CPU torch) are linked into the Dockerfile's wheelhouse for the build,
   and the host's pip CA bundle goes in as the build secret `pip_cert`: what a user offline or behind a
   TLS-intercepting proxy does; a user with network access needs neither.
4. Brings docker-compose.yml up under a project of its own with a random Redis password and token, and
   checks the stack from the host; takes it down keeping the volumes, up again, and checks that the job
   and its artifact are still there; stops containers with SIGTERM. Always takes the stack down at the end.

Prints `CHECK <name> ok|FAILED <detail>` per check and `FIGURE` lines (times, the image size); exits 1 on
any failure. Containers run with `runc` and no default ulimits (a private CONTAINERS_CONF): with crun, or
podman's default ulimits, containers do not start on machines like this one (a container itself).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fastserve.client import FastServeClient, state_name
from fastserve.client.settings import DEFAULT_PORTS
from fastserve.stack.processes import http_health

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastserve-compose-test"
BASE_IMAGE = "localhost/fastserve-base:bookworm"
REDIS_IMAGE = "localhost/fastserve-redis:bookworm"
# docker-compose.yml's `image:`; podman finds the short name in local storage before any registry.
IMAGE = "localhost/fastserve:latest"
WHEELHOUSE = ROOT / "deploy" / "docker" / "wheelhouse"
WHEELS = Path(os.environ.get("COMPOSE_TEST_WHEELS", "/opt/wheels"))
PROJECT = "fastserve-compose-test"
GATEWAY = "http://127.0.0.1:8000"
# The containers whose HEALTHCHECK is run, and whose logs are shown when the run fails.
HEALTHCHECKED = ("inference", "gateway", "worker-preprocessing")
EMBED = "all-MiniLM-L6-v2"
# `podman stop -t` grace: a process that has not exited by then is SIGKILLed (exit code 137).
GRACE = 20
UP_TIMEOUT = float(os.environ.get("COMPOSE_TEST_UP_TIMEOUT", "900"))
# Command (or file) -> Debian package; catatonit is the `init: true` of docker-compose.yml.
TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap", "podman-compose": "podman-compose",
         "/usr/libexec/podman/catatonit": "catatonit"}
CONTAINERS_CONF = """\
# Written by deploy/compose_test.py for its own podman calls (CONTAINERS_CONF), not the user's config.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
"""
REDIS_CONTAINERFILE = f"""\
FROM {BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/* && \\
    mkdir /data && chown redis:redis /data
USER redis
WORKDIR /data
CMD ["redis-server"]
"""

failures: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"CHECK {name} {'ok' if ok else 'FAILED'}{' ' + detail if detail else ''}", flush=True)
    if not ok:
        failures.append(name)
    return ok


def result(name: str, value: str) -> None:
    print(f"FIGURE {name} {value}", flush=True)


def run(*argv: str, check_rc: bool = True, quiet: bool = False, heavy: bool = False,
        **kwargs) -> subprocess.CompletedProcess:
    """A command; `heavy` ones run under `nice` so that a loaded machine's other work goes first."""
    argv = ("nice", "-n", "19", *argv) if heavy else argv
    if not quiet:
        print("+", " ".join(argv), flush=True)
    done = subprocess.run(argv, text=True, capture_output=quiet, **kwargs)
    if check_rc and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {(done.stderr or '')[-2000:]}")
    return done


def wait_for(what: str, condition: Callable[[], bool], timeout: float, every: float = 2.0) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - start


# --- the tools and the images ---------------------------------------------------------------------------


def install_tools() -> None:
    missing = [package for tool, package in TOOLS.items() if shutil.which(tool) is None and not Path(tool).exists()]
    if missing:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(*sudo, "apt-get", "update", "-q", env=env)
        run(*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", *missing, heavy=True, env=env)
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    os.environ["CONTAINERS_CONF"] = str(conf)


def image_exists(image: str) -> bool:
    return run("podman", "image", "exists", image, check_rc=False, quiet=True).returncode == 0


def build_base() -> None:
    if image_exists(BASE_IMAGE):
        return
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastserve-rootfs-") as rootfs:
        run("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
            rootfs, "http://deb.debian.org/debian", heavy=True)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        run("podman", "import", "-", BASE_IMAGE, stdin=tar.stdout, heavy=True)
        if tar.wait() != 0:
            raise RuntimeError("tar of the base rootfs failed")
    result("base_build_seconds", f"{time.monotonic() - start:.0f}")


def build_redis() -> None:
    if image_exists(REDIS_IMAGE):
        return
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as context:
        (Path(context) / "Containerfile").write_text(REDIS_CONTAINERFILE)
        run("podman", "build", "-t", REDIS_IMAGE, context, heavy=True)
    result("redis_image_build_seconds", f"{time.monotonic() - start:.0f}")


def pip_cert() -> str:
    """The CA bundle this host's pip uses (PIP_CERT, then pip's config), else the system bundle."""
    configured = os.environ.get("PIP_CERT") or run(sys.executable, "-m", "pip", "config", "get", "global.cert",
                                                    check_rc=False, quiet=True).stdout.strip()
    for candidate in (configured, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return candidate
    return ""


def build_image() -> None:
    linked = []
    for wheel in sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []:
        target = WHEELHOUSE / wheel.name
        if not target.exists():
            try:
                os.link(wheel, target)
            except OSError:
                shutil.copyfile(wheel, target)
            linked.append(target)
    # Docker's image format: the OCI one has no HEALTHCHECK, which podman would drop.
    argv = ["podman", "build", "--format", "docker", "-f", "deploy/docker/Dockerfile", "-t", IMAGE,
            "--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
    # A torch wheel in the wheelhouse makes the torch index unneeded (it may be unreachable, too).
    if any(WHEELHOUSE.glob("torch-*.whl")):
        argv += ["--build-arg", "TORCH_INDEX="]
    if cert := pip_cert():
        argv += ["--secret", f"id=pip_cert,src={cert}"]
    start = time.monotonic()
    try:
        run(*argv, ".", cwd=ROOT, heavy=True)
    finally:
        for target in linked:
            target.unlink(missing_ok=True)
    result("image_build_seconds", f"{time.monotonic() - start:.0f}")


def check_image() -> None:
    size = int(run("podman", "image", "inspect", "--format", "{{.Size}}", IMAGE, quiet=True).stdout.strip())
    result("image_size_bytes", f"{size} ({size / 2**30:.2f} GiB)")
    uid = run("podman", "run", "--rm", "--no-healthcheck", IMAGE, "id", "-u", quiet=True, check_rc=False).stdout.strip()
    check("image_non_root", uid not in ("", "0"), f"uid {uid}")
    probe = ("import shutil, pathlib, sys; "
             "tools = [t for t in ('gcc', 'cc', 'c++', 'g++', 'make', 'ld', 'as') if shutil.which(t)]; "
             "caches = [str(p) for p in (pathlib.Path('/root/.cache'), pathlib.Path('/home/fastserve/.cache'), "
             "pathlib.Path('/wheels'), pathlib.Path('/src'), pathlib.Path('/run/secrets/pip_cert')) if p.exists()]; "
             "caches += [str(p) for p in pathlib.Path('/opt/venv').rglob('hatchling')]; "
             "print('tools', tools, 'leftovers', caches); sys.exit(1 if tools or caches else 0)")
    done = run("podman", "run", "--rm", "--no-healthcheck", "--user", "0", IMAGE, "python", "-c", probe,
               quiet=True, check_rc=False)
    check("image_no_build_tools_caches_or_secrets", done.returncode == 0, (done.stdout + done.stderr).strip()[-300:])


# --- the stack ------------------------------------------------------------------------------------------


def compose(*args: str, check_rc: bool = True) -> subprocess.CompletedProcess:
    return run("podman-compose", "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), *args, cwd=ROOT,
               check_rc=check_rc, heavy=True)


def container(service: str) -> str:
    return f"{PROJECT}_{service}_1"


def gateway_health(path: str) -> str:
    """`SERVING` when `GET path` on the gateway answers 200."""
    return http_health(GATEWAY + path, timeout=10)


def health(client: FastServeClient) -> dict[str, str]:
    # The compose file publishes each service on its default port.
    return {service: client.health(service) for service in DEFAULT_PORTS}


def tokenizer_versions(client: FastServeClient, name: str) -> list[str]:
    return [a.ref.uri for a in client.registry.list("tokenizers", name)]


def up(client: FastServeClient, label: str) -> None:
    start = time.monotonic()
    compose("up", "-d", "--no-build")
    try:
        wait_for("every service SERVING", lambda: set(health(client).values()) == {"SERVING"}, UP_TIMEOUT)
        wait_for("the gateway's /health", lambda: gateway_health("/health") == "SERVING", UP_TIMEOUT / 2)
    except TimeoutError as error:
        check(f"{label}_up", False, f"{error}; health {health(client)}, gateway /health {gateway_health('/health')}")
        raise
    result(f"{label}_up_seconds", f"{time.monotonic() - start:.0f}")


def check_stack(client: FastServeClient, token: str) -> tuple[str, str]:
    for service, status in health(client).items():
        check(f"grpc_health_{service}", status == "SERVING", status)
    cli = run(str(ROOT / ".venv" / "bin" / "fastserve"), "health", "--port", str(DEFAULT_PORTS["inference"]),
              check_rc=False, quiet=True)
    check("fastserve_health_cli_inference", cli.returncode == 0, cli.stdout.strip()[-200:])
    check("gateway_health_200", (status := gateway_health("/health")) == "SERVING", status)
    check("gateway_ui_200", (status := gateway_health("/ui")) == "SERVING", status)

    import numpy as np
    import tritonclient.http as triton
    with triton.InferenceServerClient("127.0.0.1:8000", network_timeout=120) as kserve:
        tensor = triton.InferInput("text", [2], "BYTES")
        tensor.set_data_from_numpy(np.array([b"the cat sat on the mat", b"containers"], dtype=object))
        vectors = kserve.infer(EMBED, [tensor], headers={"Authorization": f"Bearer {token}"}).as_numpy("embedding")
    check("kserve_v2_minilm_embedding", vectors is not None and vectors.shape == (2, 384),
          f"shape {None if vectors is None else vectors.shape}")

    name = f"compose-test-{secrets.token_hex(4)}"
    job = client.preprocessing.train_tokenizer("stdlib-docstrings", name, vocab_size=500)
    done = client.preprocessing.wait_job(job.job_id, timeout=600)
    state = state_name(done.state)
    check("celery_worker_ran_tokenizer_job", state == "SUCCEEDED", f"{job.job_id} {state} {done.error}")
    versions = tokenizer_versions(client, name)
    # The worker wrote it in its container; inference, which serves the registry, reads it off the shared volume.
    check("tokenizer_artifact_in_registry", bool(versions), ", ".join(versions))
    return job.job_id, name


def check_persisted(client: FastServeClient, job_id: str, name: str) -> None:
    state = state_name(client.preprocessing.get_job(job_id).state)
    check("job_history_survives_down_up", state == "SUCCEEDED", f"{job_id} {state}")
    listed = {j.job_id for j in client.preprocessing.list_jobs(page_size=100).jobs}
    check("job_listed_after_down_up", job_id in listed)
    versions = tokenizer_versions(client, name)
    check("artifact_survives_down_up", bool(versions), ", ".join(versions))


def check_container_health() -> None:
    for service in HEALTHCHECKED:
        done = run("podman", "healthcheck", "run", container(service), check_rc=False, quiet=True)
        check(f"healthcheck_{service}", done.returncode == 0, (done.stdout + done.stderr).strip()[-200:])


def check_sigterm_stop() -> None:
    for service in ("optimization", "gateway", "worker-training", "flower"):
        start = time.monotonic()
        run("podman", "stop", "-t", str(GRACE), container(service), check_rc=False, quiet=True)
        took = time.monotonic() - start
        code = run("podman", "inspect", "--format", "{{.State.ExitCode}}", container(service), quiet=True,
                   check_rc=False).stdout.strip()
        check(f"sigterm_stop_{service}", code in ("0", "143") and took < GRACE, f"exit {code} in {took:.1f} s")


def main() -> int:
    total = time.monotonic()
    install_tools()
    build_base()
    build_redis()
    build_image()
    check_image()
    password, token = secrets.token_hex(32), secrets.token_hex(32)
    # What `.env` would hold; podman-compose reads the environment too, and a user's .env stays untouched.
    os.environ.update(REDIS_PASSWORD=password, FASTSERVE_AUTH_TOKEN=token, REDIS_IMAGE=REDIS_IMAGE)
    client = FastServeClient("127.0.0.1", token=token)
    try:
        up(client, "first")
        job_id, name = check_stack(client, token)
        check_container_health()
        compose("down")
        client.close()
        client = FastServeClient("127.0.0.1", token=token)
        up(client, "second")
        check_persisted(client, job_id, name)
        check_sigterm_stop()
    except Exception as error:  # noqa: BLE001 (the run stops; what failed is reported, the stack comes down)
        check("run", False, f"{type(error).__name__}: {error}")
        for service in HEALTHCHECKED:
            logs = run("podman", "logs", "--tail", "15", container(service), check_rc=False, quiet=True)
            print(f"--- {service} logs\n{logs.stdout}{logs.stderr}", flush=True)
    finally:
        client.close()
        compose("down", check_rc=False)
        if os.environ.get("COMPOSE_TEST_KEEP_VOLUMES") != "1":
            for volume in ("fastserve-data", "redis-data"):
                run("podman", "volume", "rm", "-f", f"{PROJECT}_{volume}", check_rc=False, quiet=True)
    result("total_seconds", f"{time.monotonic() - total:.0f}")
    print("compose-test:", "FAILED " + ", ".join(failures) if failures else "every check ok", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
