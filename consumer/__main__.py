"""`python -m consumer` (terminal consumer), `python -m consumer serve` (live web page), and
`python -m consumer command | broadcast | state` (talk to devices through Kafka)."""
import sys

from common.config import run

COMMAND_ACTIONS = ("command", "broadcast", "state")


def main(argv=None) -> int:
    """Dispatch on the first word: serve, command, broadcast, state, or the terminal consumer."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from consumer.web import main as serve

        return serve(argv[1:])
    if argv[:1] and argv[0] in COMMAND_ACTIONS:
        from consumer.command_cli import main as talk

        return talk(argv[0], argv[1:])
    from consumer.cli import main as consume

    return consume(argv)


if __name__ == "__main__":
    run(main)
