"""Where a running local RabbitMQ node spends its CPU: `python -m bench.rabbitmq_profile`.

Run it in a second shell while the node is under load (`make run`, `make bench`, `make soak`):
it finds the node among this machine's RabbitMQ processes by name (default: the first whose
node name starts with --node, `webos` by default), then over --seconds (10) takes

- the schedulers' time by activity (`rabbitmq-diagnostics runtime_thread_stats`: emulator, port,
  gc, check_io, sleep...), the share of the VM that is busy at all;
- the Erlang processes by reductions (recon's `proc_window`, which RabbitMQ ships), summed by
  what they are (their initial call: `rabbit_mqtt_reader`, `rabbit_mgmt_metrics_collector`,
  `ra_server_proc`...), with the top single processes and their registered names.

It reads the node's Erlang cookie and runtime as the stack does (the data directory bind-mounted
at /webos in the node's own root); nothing is changed on the node. Prints a report and, with
--json FILE, writes the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from common import config
from stack.rabbitmq_runtime import CTL_SCRIPT, DATA_MOUNT, Runtime

DIAGNOSTICS_SCRIPT = str(Path(CTL_SCRIPT).with_name("rabbitmq-diagnostics"))
TOP = 15

# Reductions per process over the window, summed by initial call (proc_lib's '$initial_call'
# when there is one: gen_servers all start in proc_lib); and the top single processes.
_BY_KIND = """
Window = recon:proc_window(reductions, 1000000, {ms}),
Kind = fun(P) ->
    case erlang:process_info(P, [dictionary, initial_call, registered_name]) of
        undefined -> dead;
        [{{dictionary, D}}, {{initial_call, IC}}, {{registered_name, N}}] ->
            case proplists:get_value('$initial_call', D) of
                undefined -> {{IC, N}};
                {{M, F, A}} -> {{{{M, F, A}}, N}}
            end
    end
end,
Rows = [{{R, Kind(P)}} || {{P, R, _}} <- Window],
Sum = lists:foldl(fun({{R, K}}, Acc) ->
    Key = case K of {{MFA, _}} -> MFA; dead -> dead end,
    maps:update_with(Key, fun(V) -> V + R end, R, Acc) end, #{{}}, Rows),
Total = lists:sum([R || {{R, _}} <- Rows]),
{{Total, lists:sublist(lists:reverse(lists:keysort(2, maps:to_list(Sum))), {top}),
 lists:sublist(lists:reverse(lists:keysort(1, Rows)), {top})}}.
"""


class Node:
    """A RabbitMQ node running on this machine, as found from its process."""

    def __init__(self, pid: int, name: str, root: str, data: str):
        self.pid, self.name, self.data = pid, name, Path(data)
        # The stack's runtime is a Debian tree the node runs chrooted in; a host install is "/".
        self.runtime = Runtime(root=None if root == "/" else Path(root), version="")

    @classmethod
    def find(cls, prefix: str) -> "Node":
        for entry in sorted(Path("/proc").iterdir(), key=lambda p: p.name):
            if not entry.name.isdigit():
                continue
            try:
                if not (entry / "comm").read_text().startswith("beam.smp"):
                    continue
                environ = (entry / "environ").read_bytes().split(b"\0")
                name = next((e.decode().split("=", 1)[1] for e in environ
                             if e.startswith(b"RABBITMQ_NODENAME=")), "")
                if not name.startswith(prefix):
                    continue
                root = os.readlink(entry / "root")
                mounts = [line.split() for line in (entry / "mountinfo").read_text().splitlines()]
            except OSError:
                continue  # gone, or not ours to read
            data = next((m[3] for m in mounts if m[4] == DATA_MOUNT), None)  # the bind mount
            return cls(int(entry.name), name, root, data or "")
        raise SystemExit(f"no running RabbitMQ node whose name starts with {prefix!r} "
                         "(make run's is webos@localhost, make bench's webos-bench-<pid>)")

    def run(self, script: str, *arguments: str, timeout: float = 300) -> str:
        """A CLI script of the node's runtime against it, with the node's cookie."""
        argv = self.runtime.command([script, "--node", self.name, *arguments], self.data)
        # The cookie is in the data directory (HOME), as the stack writes it.
        result = subprocess.run(argv, env={**os.environ, "HOME": self.runtime.data_path(self.data)},
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise SystemExit(f"{Path(script).name} {' '.join(arguments[:1])} failed: "
                             f"{(result.stderr or result.stdout).strip()[-500:]}")
        return result.stdout


def thread_stats(node: Node, seconds: int) -> dict:
    """runtime_thread_stats' per-type table: {thread type: {activity: percent}}."""
    text = node.run(DIAGNOSTICS_SCRIPT, "runtime_thread_stats", "--sample-interval", str(seconds))
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("Thread"))
    columns = lines[header].split()[1:]
    start = next(i for i, line in enumerate(lines) if line.startswith("Stats per type"))
    table = {}
    for line in lines[start + 1:]:
        match = re.match(r"\s*(\S+)\s+(.*)", line)
        if not match or "%" not in line:
            continue
        values = [float(v.rstrip("%")) for v in match.group(2).split()]
        table[match.group(1)] = dict(zip(columns, values))
    return table


def processes(node: Node, seconds: int) -> dict:
    """Reductions over `seconds` by kind of process and the top single processes."""
    answer = node.run(CTL_SCRIPT, "eval", _BY_KIND.format(ms=seconds * 1000, top=TOP),
                      timeout=seconds + 120)
    return {"erlang_term": answer.strip()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rabbitmq_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node", default="webos", help="node name prefix (webos)")
    parser.add_argument("--seconds", type=int, default=10, help="each sample's length (10)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    node = Node.find(args.node)
    print(f"profiling {node.name} (pid {node.pid}) for {args.seconds} s, twice", file=sys.stderr)
    threads = thread_stats(node, args.seconds)
    print("scheduler time by activity, % (runtime_thread_stats, per thread type):")
    for kind, activities in threads.items():
        print(f"  {kind:>16}: " + ", ".join(f"{k} {v:.1f}" for k, v in activities.items()))
    found = processes(node, args.seconds)
    print("reductions by kind of process, then the top processes (recon:proc_window):")
    print(found["erlang_term"])
    if args.json:
        args.json.write_text(json.dumps({"node": node.name, "seconds": args.seconds,
                                         "thread_stats": threads, **found}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    config.run(main)
