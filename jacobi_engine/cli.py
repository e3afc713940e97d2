"""The ``jacobi-engine`` command line.

    jacobi-engine demo [--pair gsm8k|code | --model DIR] [--prompt TEXT]
                                                        stream a Jacobi generation and compare with AR
    jacobi-engine info                                  build information (compiled kernels, versions)
    jacobi-engine collect ... / train ...               consistency training (jacobi_engine.training)
    jacobi-engine trajectory ...                        draw one Jacobi trajectory
    jacobi-engine serve --model NAME ...                OpenAI-compatible server (continuous batching)

Each subcommand lives in the module that owns it and registers itself through a
``register(subparsers)`` function.
"""

from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    import jacobi_engine

    print(json.dumps(jacobi_engine.build_info(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jacobi-engine", description="Jacobi decoding engine for LLMs")
    subparsers = parser.add_subparsers(dest="command", required=True)
    info = subparsers.add_parser("info", help="print build information")
    info.set_defaults(handler=_info)

    from jacobi_engine import demo, serve, trajectory_plot

    demo.register(subparsers)
    serve.register(subparsers)
    trajectory_plot.register(subparsers)
    try:
        from jacobi_engine.training import commands as training_commands
    except ImportError as error:  # training extras missing: say so only when asked for
        missing = str(error)

        def _missing(args: argparse.Namespace) -> int:
            print(
                f"jacobi-engine {args.command} needs the training extras (pip install 'jacobi-engine[train]'): "
                f"{missing}",
                file=sys.stderr,
            )
            return 2

        _missing.accepts_any = True

        for name in ("collect", "train"):
            subparsers.add_parser(
                name, help="(needs: pip install 'jacobi-engine[train]')", add_help=False
            ).set_defaults(handler=_missing)
    else:
        training_commands.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # A stand-in subcommand (training extras missing) accepts whatever arguments follow it, so the
    # install hint is printed instead of an argparse error about options it does not know.
    args, unknown = parser.parse_known_args(argv)
    if unknown and getattr(args, "handler", None) is not None and getattr(args.handler, "accepts_any", False):
        return int(args.handler(args) or 0)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
