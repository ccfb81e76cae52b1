"""The ``twostep`` command line: one program, a subcommand per stage.

Bad input (a missing or unreadable file, a folder of the wrong kind, a bad flag value) ends the
command with one line, ``twostep COMMAND: error: <what and why>``, and exit status 2, like
argparse's own usage errors; ``--debug`` or ``-v`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from twostep.common.logs import configure_logging

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    from twostep import demo as demo_cli
    from twostep import eval as eval_cli
    from twostep.pipeline import cli as pipeline_cli
    from twostep.prompts import cli as prompts_cli
    from twostep.trainer import cli as trainer_cli
    from twostep.trainer import probe as probe_cli
    from twostep.trainer import sample as sample_cli

    parser = argparse.ArgumentParser(
        prog="twostep",
        description="Distil an 8-step text-to-image teacher into a 2-step student: prompt manifests, "
                    "teacher generation to WebDataset shards, streaming training, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"twostep {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also log the libraries' INFO lines (accelerate, Ray and its workers' output) and "
                             "twostep's debug messages; show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback when a command fails on bad input")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="the stage to run; 'twostep COMMAND --help' explains its flags")
    prompts_cli.add_parser(sub)
    pipeline_cli.add_parsers(sub)
    trainer_cli.add_parser(sub)
    probe_cli.add_parser(sub)
    sample_cli.add_parser(sub)
    eval_cli.add_parser(sub)
    demo_cli.add_parser(sub)
    return parser


def _expected(e: BaseException) -> bool:
    """Errors that bad input raises (as opposed to bugs): shown as one line, not a traceback."""
    from twostep.pipeline.store import StoreError

    # OSError: missing, unreadable or wrong-kind paths (FileNotFoundError, NotADirectoryError, …);
    # ValueError: bad values and unreadable content (ConfigError, ManifestError, InputError,
    # pyarrow.ArrowInvalid, json.JSONDecodeError); StoreError: a store that cannot be used as asked.
    return isinstance(e, (OSError, ValueError, StoreError))


def _command(args: argparse.Namespace) -> str:
    """``generate``, ``prompts inspect``, …: the words of the command line that chose ``args.func``."""
    sub = getattr(args, "prompts_cmd", None)
    return f"{args.command} {sub}" if sub else args.command


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except Exception as e:
        if args.debug or args.verbose or not _expected(e):
            raise
        message = str(e).strip() or type(e).__name__
        print(f"twostep {_command(args)}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
