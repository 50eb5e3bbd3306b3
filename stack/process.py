"""A broker run as a project-owned background process: pid file, log file, readiness, clean stop."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from common.config import REPO_ROOT

LOGGER = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """A broker did not start or did not become ready; the message says where its log is."""


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of source ports for outgoing connections (ip_local_port_range)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(*offsets: int) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and nor on port + each offset.

    Chosen below the ephemeral range: a port from it (what binding port 0 gives) can be taken as
    the source port of any outgoing connection between now and the moment a broker binds it.
    """
    offsets = {0, *offsets}
    low, high = 10000, ephemeral_ports()[0] - 1 - max(offsets)
    if high <= low:
        low, high = 1024, 65535 - max(offsets)
    while True:
        port = random.randint(low, high)
        if all(_bindable(port + extra) for extra in offsets):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def answers(url: str, auth=None, verify=True) -> bool:
    """True when `url` answers 200 now (`verify`: the CA file for an https URL)."""
    try:
        return requests.get(url, auth=auth, verify=str(verify) if verify is not True else True,
                            timeout=2).status_code == 200
    except requests.RequestException:
        return False


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalProcess:
    """One broker process whose data, log and pid file live under `base_dir`."""

    name = "process"

    def __init__(self, base_dir: Path):
        self.base_dir = Path(base_dir)
        self.log_path = self.base_dir / f"{self.name}.log"
        self.pid_path = self.base_dir / f"{self.name}.pid"
        self.process: subprocess.Popen | None = None

    # Subclasses provide these three.
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def probe(self) -> bool:
        """True once the broker answers as its clients need it to."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Write configuration, format storage: anything needed before the first start."""

    def describe(self) -> str:
        """How logs and `make status` name it."""
        return self.name

    def pid(self) -> int | None:
        """The pid of a running instance started from this base_dir, if any."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def start(self) -> None:
        """Start the process in its own session so a Ctrl-C meant for the apps does not hit it."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), env=self.environment(), stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=self.base_dir, start_new_session=True)
        log.close()
        self.pid_path.write_text(str(self.process.pid))
        LOGGER.info("%s started (pid %s), log %s", self.describe(), self.process.pid, self.log_path)

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Ask the broker until it answers; return the seconds waited. Raises BrokerError."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BrokerError(f"{self.describe()} exited with code {self.process.returncode} "
                                  f"before it was ready; its log ({self.log_path}) ends:\n"
                                  f"{tail(self.log_path)}")
            if self.probe():
                return time.monotonic() - started
            time.sleep(0.2)
        raise BrokerError(f"{self.describe()} was not ready after {timeout:.0f} s; its log "
                          f"({self.log_path}) ends:\n{tail(self.log_path)}")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (a clean shutdown for both brokers), SIGKILL only if that takes too long."""
        pid = self.process.pid if self.process is not None else self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not self._wait_exit(pid, timeout):
            LOGGER.warning("%s (pid %s) did not stop within %.0f s; killing it", self.describe(),
                           pid, timeout)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._wait_exit(pid, 10)
        self.pid_path.unlink(missing_ok=True)
        LOGGER.info("%s stopped", self.describe())

    def main_pid(self) -> int | None:
        """The process that does the broker's work (subclasses whose command is a wrapper say
        which of its children that is)."""
        return self.process.pid if self.process is not None else self.pid()

    def hang(self) -> None:
        """SIGSTOP of the broker's own process, for fault tests: a hung node, whose sockets stay
        open and accept connections while nothing answers."""
        os.kill(self.main_pid(), signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the hung node runs on."""
        os.kill(self.main_pid(), signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        pid = self.process.pid if self.process is not None else self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, 10)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.pid == pid:
                if self.process.poll() is not None:
                    return True
            else:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our child: reap it
                        return True
                except ChildProcessError:
                    pass  # started by an earlier `python -m stack up`: not ours to reap
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return True
            time.sleep(0.1)
        return False


class ProcessExited(RuntimeError):
    """A child process that had to keep running exited; the message ends with its output."""


def wait_until(condition, timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition", watch=()):
    """Call `condition` until it returns something truthy and return that. Raises TimeoutError
    after `timeout` s, or ProcessExited as soon as one of the AppProcesses in `watch` exits."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        for process in watch:
            process.check_running(f"while waiting for {message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)


class AppProcess:
    """`python -m <package> ARGS` as a child of this process, as a user runs an app, or
    `python -c CODE ...` when ARGS begin with an interpreter option. Its output goes to
    `log_path` (stderr to `stderr_path` instead, when given); stopped with a signal. For the
    tests and benchmarks; `new_session` gives it a process group of its own, as a shell job has."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, name: str = "", *,
                 stderr_path: Path | None = None, new_session: bool = False):
        self.name = name or args[0]
        self.log_path = Path(log_path)
        self.stderr_path = Path(stderr_path) if stderr_path else None
        argv = [sys.executable, *args] if args[0].startswith("-") else [sys.executable, "-m", *args]
        with contextlib.ExitStack() as files:
            log = files.enter_context(open(self.log_path, "ab"))
            errors = (files.enter_context(open(self.stderr_path, "ab")) if self.stderr_path
                      else subprocess.STDOUT)
            self.process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=errors,
                                            stdin=subprocess.DEVNULL, start_new_session=new_session)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def check_running(self, context: str = "") -> None:
        """Raise ProcessExited, with the end of its output, if it is no longer running."""
        if not self.running:
            raise ProcessExited(f"{self.name} exited with code {self.process.returncode}"
                                f"{' ' + context if context else ''}; its output ends:\n"
                                f"{self.output(30)}")

    def output(self, lines: int | None = None, stream: str = "stdout") -> str:
        """What it printed so far (the last `lines` lines only, if given); `stream="stderr"`
        reads the separate stderr file."""
        path = self.stderr_path if stream == "stderr" and self.stderr_path else self.log_path
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return ""
        return text if lines is None else "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0, signum: int = signal.SIGTERM) -> int:
        """Send `signum` and wait; SIGKILL if it has not exited after `timeout`. Its exit code."""
        if self.running:
            self.process.send_signal(signum)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                LOGGER.warning("%s did not stop within %.0f s: killing it", self.name, timeout)
        return self.kill()

    def kill(self) -> int:
        """SIGKILL (kill -9) and reap it; its exit code."""
        if self.running:
            self.process.kill()
        return self.process.wait(10)
