"""`make images`: a container engine and the images docker-compose.yml runs, built here from
Debian packages for machines where no image registry answers.

The engine is Debian's podman with runc (containers/containers.conf says why those settings),
whose Docker-compatible API docker-compose and testcontainers use: `podman system service` on a
socket of its own (ENGINE_SOCKET), started here in the background and stopped by `python -m
stack.images stop-engine`. The images, each tagged with a digest of what went into it, so that a
second run reuses them:
- webos-base: Debian 13 (mmdebstrap, apt variant) trusting the machine's own CA certificates
  (an egress proxy's, here) so that apt and pip inside a build reach their archives;
- webos-rabbitmq: the very root `make run` runs RabbitMQ from (stack/rabbitmq_runtime.py) with
  this repository's rabbitmq.conf and plugins (containers/rabbitmq.Containerfile);
- webos-kafka: Kafka's jars from kafka/lib on Debian's Java (containers/kafka.Containerfile);
- webos-python, then webos-app: the apps' image (Dockerfile) on Debian's Python. Built here, not
  by docker-compose: its builds go through the docker CLI, which does not read .env's DOCKER_HOST.
Their names go into .env as RABBITMQ_IMAGE, KAFKA_IMAGE, PYTHON_IMAGE and APP_IMAGE, with
DOCKER_HOST, which docker-compose reads; without them it uses the official images and builds
the apps' image itself.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dotenv import set_key

from common.config import DOTENV_PATH, REPO_ROOT, ensure_credentials
from stack.rabbitmq_runtime import RuntimeMissing, debian_mirror, ensure_runtime, recipe_id

LOGGER = logging.getLogger(__name__)
CONTAINERS = REPO_ROOT / "containers"
ENGINE_DIR = (Path("/run/webos-podman") if os.geteuid() == 0
              else Path(os.environ.get("XDG_RUNTIME_DIR", tempfile.gettempdir())) / "webos-podman")
ENGINE_SOCKET = ENGINE_DIR / "podman.sock"
DOCKER_HOST = f"unix://{ENGINE_SOCKET}"
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
SUITE = "trixie"


def engine_env() -> dict[str, str]:
    """podman's environment: this project's containers.conf, the machine's left alone."""
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS / "containers.conf")}


def podman(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], env=engine_env(), **kwargs)


def engine_answers(path: Path = ENGINE_SOCKET) -> bool:
    """True when the engine's API answers its ping on `path`."""
    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(3)
            self.sock.connect(str(path))
    try:
        connection = UnixConnection("localhost", timeout=3)
        connection.request("GET", "/_ping")
        return connection.getresponse().status == 200
    except OSError:
        return False


def start_engine(timeout: float = 30.0) -> bool:
    """The API service on ENGINE_SOCKET, in the background, unless it answers already; True
    when this call started it."""
    if engine_answers():
        return False
    ENGINE_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = open(ENGINE_DIR / "service.log", "ab")
    process = subprocess.Popen(["podman", "system", "service", "--time=0", DOCKER_HOST],
                               env=engine_env(), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    (ENGINE_DIR / "service.pid").write_text(f"{process.pid}\n")
    deadline = time.monotonic() + timeout
    while not engine_answers():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"podman's API service did not start; see {ENGINE_DIR}/service.log")
        time.sleep(0.2)  # polling the socket the service is about to open
    LOGGER.info("podman's Docker API on %s (stop it: python -m stack.images stop-engine)",
                DOCKER_HOST)
    return True


def stop_engine() -> bool:
    """Stop the API service start_engine started; True when there was one."""
    pid_file = ENGINE_DIR / "service.pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
    except (ProcessLookupError, ValueError):
        pass
    pid_file.unlink()
    ENGINE_SOCKET.unlink(missing_ok=True)
    return True


def digest(*parts: Path | str) -> str:
    """A short digest of files (their bytes, directories walked) and strings."""
    hasher = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            files = sorted(p for p in part.rglob("*") if p.is_file()) if part.is_dir() else [part]
            for file in files:
                hasher.update(file.name.encode())
                hasher.update(file.read_bytes())
        else:
            hasher.update(part.encode())
    return hasher.hexdigest()[:12]


def image_exists(name: str) -> bool:
    return podman("image", "exists", name).returncode == 0


def _ensure(name: str, make) -> str:
    if image_exists(name):
        LOGGER.info("%s: built already", name)
        return name
    LOGGER.info("%s: building", name)
    started = time.monotonic()
    make(name)
    LOGGER.info("%s: built in %.0f s", name, time.monotonic() - started)
    return name


def _import_base(name: str) -> None:
    """Debian 13 (apt variant) with the machine's extra CA certificates trusted."""
    mirror = debian_mirror()
    with tempfile.TemporaryDirectory() as work:
        tarball = Path(work) / "base.tar"
        hooks = []
        if HOST_CA_DIR.is_dir() and any(HOST_CA_DIR.glob("*.crt")):
            hooks = [f"--customize-hook=copy-in {' '.join(map(str, HOST_CA_DIR.glob('*.crt')))} "
                     f"{HOST_CA_DIR}", "--customize-hook=chroot \"$1\" update-ca-certificates"]
        subprocess.run(["mmdebstrap", "--variant=apt", "--include=ca-certificates",
                        "--dpkgopt=path-exclude=/usr/share/doc/*", *hooks, SUITE, str(tarball),
                        *([mirror] if mirror else [])], check=True, stdin=subprocess.DEVNULL)
        podman("import", str(tarball), name, check=True, stdout=subprocess.DEVNULL)


def _import_rabbitmq_root(name: str) -> None:
    """The root `make run` runs RabbitMQ from, as an image."""
    root = ensure_runtime().root
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    podman("import", "-", name, stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
    tar.wait()


def _build(containerfile: Path, context: Path, **args: str):
    def make(name: str) -> None:
        build_args = [f"--build-arg={key}={value}" for key, value in args.items()]
        podman("build", "--quiet", "--network=host", "-f", str(containerfile), *build_args, "-t", name,
               str(context), check=True)
    return make


def build_images() -> dict[str, str]:
    """Every image, reusing those built before; the .env variables that name them."""
    ca = [p for p in HOST_CA_DIR.glob("*.crt")] if HOST_CA_DIR.is_dir() else []
    base = _ensure(f"localhost/webos-base:{SUITE}-{digest(SUITE, *ca)}", _import_base)
    root = _ensure(f"localhost/webos-rabbitmq-root:{recipe_id()}", _import_rabbitmq_root)
    rabbitmq_file = CONTAINERS / "rabbitmq.Containerfile"
    rabbitmq_inputs = (rabbitmq_file, CONTAINERS / "rabbitmq-entrypoint.sh",
                       REPO_ROOT / "rabbitmq" / "rabbitmq.conf", REPO_ROOT / "rabbitmq" / "enabled_plugins")
    rabbitmq = _ensure(f"localhost/webos-rabbitmq:4.0-{digest(root, *rabbitmq_inputs)}",
                       _build(rabbitmq_file, REPO_ROOT, ROOT_IMAGE=root))
    kafka_file = CONTAINERS / "kafka.Containerfile"
    kafka = _ensure(f"localhost/webos-kafka:4.1.1-{digest(base, kafka_file, REPO_ROOT / 'kafka')}",
                    _build(kafka_file, REPO_ROOT / "kafka", BASE_IMAGE=base))
    python_file = CONTAINERS / "python.Containerfile"
    python = _ensure(f"localhost/webos-python:{SUITE}-{digest(base, python_file)}",
                     _build(python_file, CONTAINERS, BASE_IMAGE=base))
    app_inputs = [REPO_ROOT / name for name in ("Dockerfile", "requirements.txt", "common", "stack",
                                                "rabbitmq", "publisher", "bridge", "consumer")]
    app = _ensure(f"localhost/webos-app:{digest(python, *app_inputs)}",
                  _build(REPO_ROOT / "Dockerfile", REPO_ROOT, PYTHON_IMAGE=python))
    return {"RABBITMQ_IMAGE": rabbitmq, "KAFKA_IMAGE": kafka, "PYTHON_IMAGE": python,
            "APP_IMAGE": app}


def write_env(values: dict[str, str], dotenv_path: Path = DOTENV_PATH) -> None:
    """Name the images and the engine in .env (docker-compose reads it); other lines stay."""
    if not dotenv_path.exists():
        dotenv_path.touch(mode=0o600)
    for key, value in values.items():
        set_key(str(dotenv_path), key, value, quote_mode="never")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stack.images", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="build", choices=["build", "stop-engine"],
                        help="build (default): start the engine's API, build what is missing, "
                        "write .env; stop-engine: stop the API service (containers stay)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "stop-engine":
        print("stopped podman's API service" if stop_engine() else "no API service of ours runs")
        return 0
    started = time.monotonic()
    try:
        start_engine()
        values = build_images()
    except (subprocess.CalledProcessError, RuntimeMissing, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    ensure_credentials()  # the brokers' passwords, as make run makes them
    write_env({**values, "DOCKER_HOST": DOCKER_HOST})
    for key, value in values.items():
        print(f"{key}={value}")
    print(f"images ready in {time.monotonic() - started:.0f} s; written into {DOTENV_PATH}. "
          "Next: docker-compose up -d")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
