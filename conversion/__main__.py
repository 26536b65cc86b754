"""Command line: `python -m conversion RECIPE.yaml OUTPUT_DIR [--force] [--push-to-hub REPO_ID [--private]]`.

Exit status 0 on success, 2 on any failure (the last line on stderr, and for a problem found before writing the only
one, says what and how to fix it), 130 when interrupted.
"""

import argparse
import logging
import sys
import traceback

from .compose import compose
from .errors import ConversionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="composite-convert",
        description="Compose multimodal LLMs fine-tuned from one base LLM into one composite model (NaiveMC / DAMC).",
    )
    parser.add_argument("recipe", help="the recipe YAML file")
    parser.add_argument("output_dir", help="the composite folder to create")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT_DIR if it exists")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the finished composite to this Hub repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo as private")
    parser.add_argument("--max-shard-size", default="2GB", help="largest weight shard (default: 2GB)")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the result in a fresh process")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private only applies with --push-to-hub")
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("conversion").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        path = compose(
            args.recipe,
            args.output_dir,
            force=args.force,
            verify=not args.no_verify,
            max_shard_size=args.max_shard_size,
            push_to_hub=args.push_to_hub,
            private=args.private,
        )
    except ConversionError as error:
        print("error: " + str(error).replace("\n", " "), file=sys.stderr)
        return 2
    except Exception as error:  # a failure nobody anticipated still ends in one line and status 2
        print(_unexpected(error, args.verbose), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(f"composite written to {path}")
    return 0


def _unexpected(error: Exception, verbose: bool) -> str:
    """The error line for an exception that is not a `ConversionError` (a bug, or a failure we did not foresee);
    with --verbose the traceback comes first, so the line stays last."""
    if verbose:
        traceback.print_exc(file=sys.stderr)
    problem = " ".join(str(error).split()) or "no message"
    hint = "" if verbose else "; rerun with -v for the traceback"
    return f"error: unexpected {type(error).__name__}: {problem} (please report it{hint})"


if __name__ == "__main__":
    sys.exit(main())
