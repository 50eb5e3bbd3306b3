"""The apps of `make run` (publisher, bridge, consumer) under supervisord: restarted when they
exit, their output on the console line by line with each app's name, their state for `make status`."""
from __future__ import annotations

import configparser
import datetime
import logging
import os
import secrets
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import threading
import xmlrpc.client
from pathlib import Path

import psutil

from common.config import REPO_ROOT, Settings, stack_dir

LOGGER = logging.getLogger("stack")


# The apps `make run` supervises, as `make status` lists them. supervisord starts them in reverse
# and stops them in this order: the publisher first, so nothing new arrives while the bridge drains.
# The relay is the bridge's other direction: commands from Kafka to the devices.
APPS = {
    "publisher": ["-m", "publisher"],
    "bridge": ["-m", "bridge"],
    "relay": ["-m", "bridge", "relay"],
    "consumer": ["-m", "consumer", "serve"],
}
# supervisord's restart policy: autorestart=true, whatever the exit code. An app that stayed up
# STARTSECS counts as started: when it exits later (a crash, `kill -9`) it is started again at
# once, every time. One that exits sooner is a failed start: it is started again after 1 s, then
# 2 s, 3 s ... up to STARTRETRIES s; after STARTRETRIES + 1 failed starts in a row supervisord
# gives up on it (FATAL: "gave up" in the log and in `make status`) and leaves it stopped, while
# the brokers and the other apps keep running, until `supervisorctl start` or the next `make run`.
# A start that fails that fast is a configuration error (the bridge exits 2 on those), not an
# outage: the apps ride out broker outages by reconnecting.
STARTSECS = 5
STARTRETRIES = 5
# How long an app may take to stop after SIGTERM before supervisord kills it: more than the
# bridge's Kafka flush (10 s).
STOPWAITSECS = 20
STATE_WORDS = {"STOPPED": "stopped", "STARTING": "starting", "RUNNING": "running",
               "BACKOFF": "backing off", "STOPPING": "stopping", "EXITED": "exited",
               "FATAL": "gave up", "UNKNOWN": "unknown"}


def supervisor_dir(settings: Settings) -> Path:
    """Where `make run`'s supervisord keeps its config and control socket while it runs."""
    return stack_dir(settings) / "supervisor"


def supervisorctl_command(settings: Settings) -> str:
    """The command that controls the apps of a running `make run` (add `start bridge`, say)."""
    return shlex.join([str(Path(sys.executable).parent / "supervisorctl"),
                       "-c", str(supervisor_dir(settings) / "supervisord.conf")])


def supervisord_config(settings: Settings, apps: dict[str, list[str]], output_fds: dict[str, int],
                       password: str) -> str:
    """supervisord's configuration: in the foreground, controlled over a unix socket only (mode
    0600, a password of this run), each app's stdout and stderr into the pipe `output_fds[name]`."""
    run_dir = supervisor_dir(settings)

    def value(text) -> str:
        return str(text).replace("%", "%%")  # supervisord expands %(name)s in values

    socket_path = value(run_dir / "supervisor.sock")
    lines = ["[supervisord]", "nodaemon=true",
             # Its log goes to its stdout too (nodaemon), which run_apps shows on the console.
             "logfile=/dev/null", "logfile_maxbytes=0", "logfile_backups=0",
             f"pidfile={value(run_dir / 'supervisord.pid')}", f"childlogdir={value(run_dir)}",
             # The user it already runs as: as root, without this, it warns it kept root.
             f"user={os.getuid()}",
             "", "[unix_http_server]", f"file={socket_path}", "chmod=0600",
             "username=stack", f"password={password}",
             "", "[supervisorctl]", f"serverurl=unix://{socket_path}",
             "username=stack", f"password={password}",
             "", "[rpcinterface:supervisor]",
             "supervisor.rpcinterface_factory=supervisor.rpcinterface:make_main_rpcinterface"]
    for index, (name, arguments) in enumerate(apps.items()):
        command = shlex.join([sys.executable, *arguments])
        if "\n" in command:
            raise ValueError(f"{name}'s command has a line break, which supervisord cannot take")
        lines += ["", f"[program:{name}]", f"command={value(command)}",
                  f"directory={value(REPO_ROOT)}", f"priority={len(apps) - index}",
                  "autostart=true", "autorestart=true",
                  f"startsecs={STARTSECS}", f"startretries={STARTRETRIES}",
                  "stopsignal=TERM", f"stopwaitsecs={STOPWAITSECS}",
                  "redirect_stderr=true", f"stdout_logfile=/dev/fd/{output_fds[name]}",
                  "stdout_logfile_maxbytes=0", "stdout_logfile_backups=0"]
    return "\n".join(lines) + "\n"


def supervisor_rpc(settings: Settings, password: str | None = None):
    """An XML-RPC proxy to `make run`'s supervisord over its unix socket; the password is read
    from its config when not given. Calls raise OSError while no supervisord listens."""
    from supervisor.xmlrpc import SupervisorTransport

    run_dir = supervisor_dir(settings)
    if password is None:
        config = configparser.RawConfigParser()
        try:
            config.read(run_dir / "supervisord.conf")
            password = config.get("supervisorctl", "password")
        except configparser.Error:
            raise FileNotFoundError(f"no complete {run_dir / 'supervisord.conf'}") from None
    transport = SupervisorTransport("stack", password, f"unix://{run_dir / 'supervisor.sock'}")
    return xmlrpc.client.ServerProxy("http://localhost", transport=transport)


def describe_app(info: dict, program: dict) -> str:
    """`make status`'s line for one app, from supervisord's process and program info."""
    state = info["statename"]
    line = f"{info['name']}: {STATE_WORDS.get(state, state.lower())}"
    if state in ("RUNNING", "STARTING", "STOPPING"):
        uptime = datetime.timedelta(seconds=max(0, info["now"] - info["start"]))
        line += f", pid {info['pid']}, up {uptime}"
    elif state == "BACKOFF":
        line += f" (it exited within {program['startsecs']} s of its start; started again shortly)"
    elif state == "FATAL":
        line += (f" after {program['startretries'] + 1} failed starts in a row (each exited within "
                 f"{program['startsecs']} s); its output on the `make run` console says why")
    elif state == "EXITED":
        line += ", being started again"
    return line


def app_status(settings: Settings) -> list[str]:
    """`make status`'s lines for the apps: the state of each under `make run`."""
    try:
        rpc = supervisor_rpc(settings)
        infos = rpc.supervisor.getAllProcessInfo()
        programs = {program["name"]: program for program in rpc.supervisor.getAllConfigInfo()}
    except (OSError, xmlrpc.client.Error):
        return [f"{name}: stopped (no `make run` supervises the apps)" for name in APPS]
    order = list(APPS)
    infos.sort(key=lambda info: (order.index(info["name"]) if info["name"] in order else len(order),
                                 info["name"]))
    return [describe_app(info, programs[info["name"]]) for info in infos]


def listening(socket_path: Path) -> bool:
    """True when something accepts connections on the unix socket `socket_path`."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(socket_path))
            return True
        except OSError:
            return False


def apps_running(settings: Settings) -> bool:
    """True while a `make run` of this stack supervises its apps (its supervisord answers)."""
    return listening(supervisor_dir(settings) / "supervisor.sock")


def relay_output(pipes: dict[int, str], console) -> None:
    """Copy the lines read from each pipe to `console`, prefixed by the pipe's name (as honcho
    did), until every pipe is closed."""
    width = max(map(len, pipes.values()))
    selector = selectors.DefaultSelector()
    for fd, name in pipes.items():
        selector.register(fd, selectors.EVENT_READ, [f"{name:<{width}} | ".encode(), b""])
    while selector.get_map():
        for key, _ in selector.select():
            prefix, partial = key.data
            chunk = os.read(key.fd, 65536)
            if chunk:
                *lines, key.data[1] = (partial + chunk).split(b"\n")
            else:
                lines = [partial] if partial else []
                selector.unregister(key.fd)
                os.close(key.fd)
            try:
                console.write(b"".join(prefix + line + b"\n" for line in lines))
                console.flush()
            except OSError:
                pass  # the console is gone: keep draining, or supervisord and the apps would block


class AppWatch:
    """Tells the log what supervisord's own lines do not: an app backs off, or gave up."""

    def __init__(self, settings: Settings, rpc):
        self.settings, self.rpc = settings, rpc
        self.seen: dict[str, tuple[str, int]] = {}  # each app's state and when it last started
        self.failed_starts: dict[str, int] = {}
        self.pids: dict[str, int] = {}  # last known pid of each app, for run_apps' last resort

    def poll(self) -> None:
        """Ask supervisord for every app's state and log the changes worth a line."""
        try:
            infos = self.rpc.supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Error):
            return  # not listening yet, or shutting down
        for info in infos:
            name, state = info["name"], info["statename"]
            if info["pid"]:
                self.pids[name] = info["pid"]
            # A failed start can begin and end between two polls: its start time tells it apart.
            if (state, info["start"]) == self.seen.get(name):
                continue
            self.seen[name] = state, info["start"]
            if state == "RUNNING":
                self.failed_starts[name] = 0
            elif state == "BACKOFF":
                failed = self.failed_starts[name] = self.failed_starts.get(name, 0) + 1
                if failed <= STARTRETRIES:
                    LOGGER.warning("%s exited within %d s of its start (%d failed start%s in a row): "
                                   "backing off, next start in %d s", name, STARTSECS, failed,
                                   "" if failed == 1 else "s", failed)
            elif state == "FATAL":
                LOGGER.error("%s gave up: %d failed starts in a row; the brokers and the other apps "
                             "keep running. Its output above says why; once fixed, start it with "
                             "`%s start %s` (or Ctrl-C and `make run` again)", name,
                             STARTRETRIES + 1, supervisorctl_command(self.settings), name)


def stop_orphans(apps: dict[str, list[str]], pids: dict[str, int]) -> None:
    """SIGTERM the apps a dead supervisord left running (each checked by its command line)."""
    orphans = []
    for name, pid in pids.items():
        try:
            process = psutil.Process(pid)
            if process.cmdline()[1:] == apps.get(name):
                orphans.append(process)
        except psutil.Error:
            continue
    for process in orphans:
        LOGGER.warning("stopping pid %d (%s), left running without supervisord", process.pid,
                       shlex.join(process.cmdline()[1:]))
        process.terminate()
    for process in psutil.wait_procs(orphans, timeout=STOPWAITSECS)[1]:
        process.kill()


def _write_config(run_dir: Path, text: str) -> Path:
    """supervisord.conf in `run_dir`, readable by this user only; written whole, then renamed
    into place: `make status` may read it at any moment."""
    config_path = run_dir / "supervisord.conf"
    written = run_dir / "supervisord.conf.new"
    written.unlink(missing_ok=True)
    with os.fdopen(os.open(written, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as config:
        config.write(text)
    written.rename(config_path)
    return config_path


def _start_supervisord(settings: Settings, config_path: Path, pipes: dict[str, tuple[int, int]],
                       apps) -> subprocess.Popen:
    """supervisord in the foreground of its own session (a terminal's Ctrl-C reaches this process
    alone, which stops it once), its lines and each app's on their pipe's writing end."""
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(config_path)], env=env,
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=pipes["supervisord"][1],
            stderr=subprocess.STDOUT, pass_fds=[pipes[name][1] for name in apps],
            start_new_session=True)
    finally:
        for _, write in pipes.values():
            os.close(write)  # supervisord has them: the pipes end when it does


def _supervise(supervisord: subprocess.Popen, watch: AppWatch, apps) -> int:
    """Until supervisord exits; its exit code as a shell reports it (128 + signal)."""
    while True:
        try:
            code = supervisord.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            watch.poll()
    # 0: supervisord itself got SIGTERM or SIGINT and stopped every app, a requested stop.
    if code != 0:
        LOGGER.error("supervisord exited with %s: the apps are no longer supervised",
                     f"code {code}" if code > 0 else signal.Signals(-code).name)
        stop_orphans(apps, watch.pids)
    return code if code >= 0 else 128 - code


def _stop_supervisord(supervisord: subprocess.Popen) -> int:
    """SIGTERM to supervisord (it stops every app) and wait; 0."""
    LOGGER.info("stopping the apps")
    supervisord.send_signal(signal.SIGTERM)
    while True:  # an impatient second Ctrl-C changes nothing: the apps stop once
        try:
            supervisord.wait()
            return 0
        except KeyboardInterrupt:
            continue


def _clean_up(run_dir: Path, relay: threading.Thread, pipes: dict[str, tuple[int, int]]) -> None:
    """Read what is left on the pipes, then remove the run directory's files."""
    if relay.ident is None:
        for read, _ in pipes.values():
            os.close(read)
    else:
        relay.join(timeout=5)  # the rest of what supervisord and the apps wrote
    # supervisord removes its socket and pid file as it exits, unless it was killed.
    for name in ("supervisord.conf", "supervisor.sock", "supervisord.pid"):
        (run_dir / name).unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:
        pass  # holds something else


def run_apps(settings: Settings, apps: dict[str, list[str]] = APPS) -> int:
    """Run the apps (python + each command line) under supervisord in the foreground, restarting
    each that exits (see STARTSECS), until Ctrl-C or SIGTERM: then stop them all and return 0.
    If supervisord itself fails, stop what it left running and return its exit code."""
    run_dir = supervisor_dir(settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o700)
    socket_path = run_dir / "supervisor.sock"
    if listening(socket_path):
        LOGGER.error("the apps of this stack already run under another supervisord (%s answers): "
                     "is an earlier `make run` still running?", socket_path)
        return 1
    password = secrets.token_urlsafe(18)
    # One pipe per app and one for supervisord's own lines; the reading ends stay here.
    pipes = {name: os.pipe() for name in ("supervisord", *apps)}
    config_path = _write_config(run_dir, supervisord_config(
        settings, apps, {name: pipes[name][1] for name in apps}, password))
    relay = threading.Thread(target=relay_output, name="app-output", daemon=True,
                             args=({read: name for name, (read, _) in pipes.items()},
                                   sys.stdout.buffer))
    supervisord = None
    try:
        supervisord = _start_supervisord(settings, config_path, pipes, apps)
        relay.start()
        return _supervise(supervisord, AppWatch(settings, supervisor_rpc(settings, password)), apps)
    except KeyboardInterrupt:
        return 0 if supervisord is None else _stop_supervisord(supervisord)
    finally:
        _clean_up(run_dir, relay, pipes)
