"""The ``twostep`` command line: one program, a subcommand per stage."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    from twostep import demo as demo_cli
    from twostep import eval as eval_cli
    from twostep.pipeline import cli as pipeline_cli
    from twostep.prompts import cli as prompts_cli
    from twostep.trainer import cli as trainer_cli
    from twostep.trainer import sample as sample_cli

    parser = argparse.ArgumentParser(
        prog="twostep",
        description="Distil an 8-step text-to-image teacher into a 2-step student: prompt manifests, "
                    "teacher generation to WebDataset shards, streaming training, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"twostep {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="the stage to run; 'twostep COMMAND --help' explains its flags")
    prompts_cli.add_parser(sub)
    pipeline_cli.add_parsers(sub)
    trainer_cli.add_parser(sub)
    sample_cli.add_parser(sub)
    eval_cli.add_parser(sub)
    demo_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
