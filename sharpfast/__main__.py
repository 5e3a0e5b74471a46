"""``python -m sharpfast ...`` and the ``sharpfast`` console command."""
import sys


def main() -> int:
    """The command line, loaded here so that an interrupt while torch loads is said, not a traceback."""
    try:
        from .study.cli import main as command_line
    except KeyboardInterrupt:
        print("sharpfast: interrupted; rerun to resume", file=sys.stderr)
        return 130
    return command_line()


if __name__ == "__main__":
    sys.exit(main())
