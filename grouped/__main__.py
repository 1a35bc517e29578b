"""Command line of the grouped package: python -m grouped info | demo."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m grouped",
        description="Grouped GEMMs for Mixture-of-Experts layers: what this machine can run, and a checked demo.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, devices, and which backend serves what here")
    demo = sub.add_parser("demo", help="run a grouped MoE layer and check it against the reference")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: the best available)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import report

        print(report())
        return 0
    from .demo import run_demo

    return run_demo(args.device)


if __name__ == "__main__":
    sys.exit(main())
