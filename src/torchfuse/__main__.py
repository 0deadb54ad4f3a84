"""Command line: ``python -m torchfuse cache info`` and ``python -m torchfuse cache clear``."""

from __future__ import annotations

import argparse
import sys

from . import diskcache


def cache_info(args: argparse.Namespace) -> None:
    """Print the on-disk kernel cache's directory, state, entries, bytes and hits."""
    info = diskcache.info()
    state = "on" if info["enabled"] else "off (TORCHFUSE_CACHE=0)"
    print(f"directory  {info['directory']}")
    print(f"disk tier  {state}")
    for name in ("entries", "bytes", "hits"):
        print(f"{name:<10} {info[name]}")


def cache_clear(args: argparse.Namespace) -> None:
    """Remove every entry of the on-disk kernel cache."""
    removed = diskcache.clear()
    print(f"removed {removed} entries from {diskcache.info()['directory']}")


def parser() -> argparse.ArgumentParser:
    """The ``python -m torchfuse`` argument parser."""
    main = argparse.ArgumentParser(prog="python -m torchfuse", description=__doc__)
    commands = main.add_subparsers(dest="command", required=True)
    cache = commands.add_parser("cache", help="the on-disk kernel cache (TORCHFUSE_CACHE_DIR)")
    actions = cache.add_subparsers(dest="action", required=True)
    actions.add_parser("info", help="entries, bytes and hits").set_defaults(run=cache_info)
    actions.add_parser("clear", help="remove every entry").set_defaults(run=cache_clear)
    return main


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
