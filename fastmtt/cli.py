"""The `fastmtt` command line."""
from __future__ import annotations

import argparse
import sys


def _compile_check(args) -> int:
    from fastmtt import compile_check

    results = compile_check.run(archs=args.arch)
    return 0 if results and all(r.ok for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmtt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("compile-check", help="compile every Triton kernel for sm_80 and sm_90 (no GPU needed)")
    check.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    check.set_defaults(func=_compile_check)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
