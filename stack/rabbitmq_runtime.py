"""RabbitMQ 4.0 on this machine: the host's own when it is 4.x, else a Debian 13 root built once.

Debian 12's rabbitmq-server is 3.10, out of support; Debian 13's is 4.0.5, whose Erlang 27 needs
a newer glibc than Debian 12 has. So the broker runs from a minimal Debian 13 root filesystem
(mmdebstrap, ~30 s, ~180 MB), built into a cache folder outside the clone and shared by every clone,
`make` target and test run on the machine. Each broker starts in a mount namespace of its own
(`unshare`), where its data directory is bound to /webos inside the root: no root needed to run it
(`--map-root-user`), the network is the host's, and nothing leaks into the host's mounts.

`python -m stack.rabbitmq_runtime` builds it (with progress) if missing and prints where it is.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOGGER = logging.getLogger(__name__)

SERVER_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"
# Not /usr/sbin/rabbitmqctl: as root that wrapper re-runs itself as the rabbitmq user, whose
# cookie is not this node's.
CTL_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmqctl"
# Where a broker's data directory appears inside the root.
DATA_MOUNT = "/webos"
SUPPORTED_MAJOR = 4
# Everything that decides what the root holds; a change here builds a new one (the old is removed).
RECIPE = {
    "suite": "trixie",
    "variant": "essential",
    "packages": ["rabbitmq-server"],
    "dpkg_excludes": ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*",
                      "/usr/share/info/*"],
    "layout": 1,  # bump when the mount points or files written into the root change
}
# Mounted in each broker's namespace: its data dir at DATA_MOUNT, and the host's /proc (RabbitMQ
# reads memory and CPU figures there). Then chroot; every step execs, so the pid that started is
# the Erlang VM itself and SIGTERM reaches it directly.
_ENTER = ('set -e; root=$1; data=$2; shift 2; '
          f'mount --bind "$data" "$root{DATA_MOUNT}"; mount --rbind /proc "$root/proc"; '
          'exec chroot "$root" "$@"')


class RuntimeMissing(RuntimeError):
    """The RabbitMQ 4 runtime is missing and cannot be built here; the message says what to do."""


@dataclass(frozen=True)
class Runtime:
    """Where a RabbitMQ 4 comes from: `root` is a Debian 13 tree, or None for the host's own."""

    root: Path | None
    version: str

    def data_path(self, data_dir: Path) -> str:
        """`data_dir` as the broker sees it."""
        return DATA_MOUNT if self.root else str(data_dir)

    def command(self, argv: list[str], data_dir: Path) -> list[str]:
        """`argv` (a path inside the root) run in its own namespace with `data_dir` mounted."""
        if self.root is None:
            return argv
        unshare = ["unshare", "--mount", "--propagation", "private"]
        if os.geteuid() != 0:
            unshare.append("--map-root-user")
        return [*unshare, "/bin/sh", "-c", _ENTER, "sh", str(self.root), str(data_dir), *argv]


def cache_dir() -> Path:
    """Where built runtimes live (WEBOS_RUNTIME_CACHE, default ~/.cache/webos-pipeline)."""
    configured = os.environ.get("WEBOS_RUNTIME_CACHE")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "webos-pipeline"


def recipe_id() -> str:
    """A short digest of RECIPE: the runtime's folder name carries it."""
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def runtime_dir() -> Path:
    return cache_dir() / f"rabbitmq-{RECIPE['suite']}-{recipe_id()}"


def _installed_version(root: Path) -> str | None:
    """The RabbitMQ version installed under `root` (from its lib folder), or None."""
    found = sorted((root / "usr/lib/rabbitmq/lib").glob("rabbitmq_server-*"))
    return found[-1].name.partition("-")[2] if found else None


def host_runtime() -> Runtime | None:
    """The host's own RabbitMQ, when it is a supported version (Debian 13, recent Ubuntu)."""
    version = _installed_version(Path("/"))
    if version and Path(SERVER_SCRIPT).exists() and int(version.split(".")[0]) >= SUPPORTED_MAJOR:
        return Runtime(root=None, version=version)
    return None


def built_runtime() -> Runtime | None:
    """The cached Debian 13 root for the current recipe, if it was built completely."""
    root = runtime_dir() / "root"
    if not (runtime_dir() / "complete").exists():
        return None
    version = _installed_version(root)
    return Runtime(root=root, version=version) if version else None


def find_runtime() -> Runtime | None:
    """The runtime the brokers use, without building anything."""
    return host_runtime() or built_runtime()


def debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str | None:
    """The Debian archive apt already uses (not its security archive), from sources.list(.d)."""
    uris = []
    for path in sorted(sources_dir.glob("sources.list.d/*.sources")):
        uris += re.findall(r"^URIs:\s*(\S+)", path.read_text(errors="replace"), re.MULTILINE)
    for path in [sources_dir / "sources.list", *sorted(sources_dir.glob("sources.list.d/*.list"))]:
        if path.exists():
            uris += re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", path.read_text(errors="replace"),
                               re.MULTILINE)
    for uri in uris:
        if uri.rstrip("/").endswith("/debian"):
            return uri
    return None


def build(progress=print) -> Runtime:
    """Build the Debian 13 root for RECIPE into the cache (one builder at a time), then return it."""
    target = runtime_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second build waits, then finds the first one's
        ready = built_runtime()
        if ready:
            return ready
        if shutil.which("mmdebstrap") is None:
            raise RuntimeMissing("mmdebstrap is missing: `make install` installs it "
                                "(apt-get install mmdebstrap)")
        mirror = debian_mirror()
        if mirror is None:
            raise RuntimeMissing("found no Debian archive in /etc/apt/sources.list(.d) to fetch "
                                "Debian 13's rabbitmq-server from")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        root = target / "root"
        command = ["mmdebstrap", f"--variant={RECIPE['variant']}",
                   f"--include={','.join(RECIPE['packages'])}",
                   "--aptopt=APT::Install-Recommends \"false\"",
                   *[f"--dpkgopt=path-exclude={pattern}" for pattern in RECIPE["dpkg_excludes"]],
                   f"--customize-hook=mkdir -p \"$1{DATA_MOUNT}\"",
                   RECIPE["suite"], str(root), mirror]
        progress(f"building the RabbitMQ 4 runtime: Debian {RECIPE['suite']} with "
                 f"{', '.join(RECIPE['packages'])} into {root} (once per machine; ~30 s, ~180 MB)")
        started = time.monotonic()
        # mmdebstrap reports each step on stderr: that is the progress a user sees.
        result = subprocess.run(command, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            raise RuntimeMissing(f"mmdebstrap failed (exit code {result.returncode}); its output "
                                "is above. Rerun `make install` once the cause is fixed.")
        version = _installed_version(root)
        if version is None or int(version.split(".")[0]) < SUPPORTED_MAJOR:
            shutil.rmtree(target, ignore_errors=True)
            raise RuntimeMissing(f"Debian {RECIPE['suite']} gave RabbitMQ {version}, not 4.x")
        (target / "recipe.json").write_text(json.dumps(RECIPE, indent=2) + "\n")
        (target / "complete").write_text(version + "\n")
        progress(f"RabbitMQ {version} runtime built in {time.monotonic() - started:.0f} s")
        _remove_stale(target)
        return Runtime(root=root, version=version)


def _remove_stale(current: Path) -> None:
    """Runtimes of earlier recipes: no clone uses them once this one is built."""
    for other in current.parent.glob("rabbitmq-*"):
        if other != current and other.is_dir():
            LOGGER.info("removing the runtime of an earlier recipe, %s", other)
            shutil.rmtree(other, ignore_errors=True)


def ensure_runtime(progress=print) -> Runtime:
    """The host's RabbitMQ 4, else the cached root, built now if missing. Raises RuntimeMissing."""
    return find_runtime() or build(progress)


def main(argv=None) -> int:
    """Command line: build the runtime if needed, print where it is."""
    parser = argparse.ArgumentParser(
        prog="python -m stack.rabbitmq_runtime",
        description="Make sure a RabbitMQ 4 runtime exists on this machine: the host's own "
                    "rabbitmq-server when it is 4.x, else a Debian 13 root built once into "
                    f"{cache_dir()} (WEBOS_RUNTIME_CACHE) with mmdebstrap. `make install` runs this.")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        runtime = ensure_runtime(progress=lambda line: print(line, flush=True))
    except RuntimeMissing as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    where = "the host's rabbitmq-server" if runtime.root is None else str(runtime.root)
    print(f"RabbitMQ {runtime.version} runtime: {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
