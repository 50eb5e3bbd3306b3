"""`python -m consumer` (terminal consumer) and `python -m consumer serve` (live web page)."""
import sys

from common.config import run


def main(argv=None) -> int:
    """Dispatch: `serve ...` runs the live view, anything else the terminal consumer."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from consumer.web import main as serve

        return serve(argv[1:])
    from consumer.cli import main as consume

    return consume(argv)


if __name__ == "__main__":
    run(main)
