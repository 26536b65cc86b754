"""Command line: `python -m conversion RECIPE.yaml OUTPUT_DIR [--force] [--push-to-hub REPO_ID [--private]]`.

Exit status 0 on success, 2 on any failure (the last line on stderr, and for a problem found before writing the only
one, says what and how to fix it), 130 when interrupted.

The conversion code (torch, transformers) is imported only once the arguments are parsed, so that `--help` and
`--example-recipe` answer at once.
"""

import argparse
import logging
import sys
import traceback

from .errors import ConversionError


_EPILOG = """\
The recipe is a YAML file that names the base LLM, the sources (local folders or Hub ids) and how to merge them:

  base: lmsys/vicuna-7b-v1.5
  method: naive                    # naive | damc
  sources:
    - path: llava-hf/llava-1.5-7b-hf
    - path: LanguageBind/Video-LLaVA-7B-hf
      modalities: [video]

`--example-recipe` prints every key with what it does and its default. Relative paths in a recipe start from the
recipe file's folder, not from the current directory.

exit status: 0 done; 2 a problem with the recipe, a source or the output (one line on stderr); 130 interrupted.
"""


class _PrintExampleRecipe(argparse.Action):
    """`--example-recipe`: print the annotated recipe and exit, like `--version` (no positional arguments needed)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from .recipe_reference import EXAMPLE_RECIPE

        sys.stdout.write(EXAMPLE_RECIPE)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="composite-convert",
        description="Compose multimodal LLMs fine-tuned from one base LLM into one composite model (NaiveMC / DAMC).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="the recipe YAML file (see --example-recipe)")
    parser.add_argument("output_dir", help="the composite folder to create")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT_DIR if it exists")
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="upload the finished composite to this Hub repo (login and access are checked before converting)",
    )
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo as private")
    parser.add_argument("--max-shard-size", default="2GB", help="largest weight shard (default: 2GB)")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip loading the result in a fresh process (without it, a composite that fails to load is not kept)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step (debug messages)")
    parser.add_argument("--example-recipe", action=_PrintExampleRecipe, help="print a recipe with every key explained")
    return parser


def configure_logging(verbose: bool) -> None:
    """Progress messages of the conversion at INFO (its details at DEBUG with -v); other libraries' warnings only."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("conversion").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private only applies with --push-to-hub")
    configure_logging(args.verbose)
    try:
        from .composer import compose

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
