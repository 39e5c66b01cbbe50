"""Command line of kerasnuc.data.

    python -m kerasnuc.data stats SPEC [SPEC...] [--indent N] [-o KEY=VALUE ...]
    python -m kerasnuc.data formats

``stats`` prints one JSON object per spec (one line each, or indented with ``--indent``);
``-o`` passes reader options (values parsed as JSON when they can be, e.g.
``-o allow_pickle=true``). Exit status 1 if any spec fails (its error goes to stderr).
"""

import argparse
import json
import sys

from kerasnuc.data.imageio import DataError
from kerasnuc.data.spec import available_formats


def _option(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass
    return key.strip(), value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kerasnuc.data", description="kerasnuc dataset tools")
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="print JSON statistics of datasets")
    stats.add_argument("specs", nargs="+", metavar="SPEC", help="FORMAT:PATH or 'sample'")
    stats.add_argument("--indent", type=int, default=None, help="indent the JSON (default: one line per spec)")
    stats.add_argument("-o", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                       help="reader option, e.g. -o prefer=xml (repeatable)")
    commands.add_parser("formats", help="list the dataset formats")
    args = parser.parse_args(argv)

    if args.command == "formats":
        for name, description in available_formats().items():
            print(f"{name:10s} {description}")
        return 0

    from kerasnuc.data.stats import spec_stats

    options = dict(args.option)
    status = 0
    for spec in args.specs:
        try:
            result = spec_stats(spec, **options)
        except DataError as error:
            print(f"{parser.prog} stats: error: {spec}: {error}", file=sys.stderr)
            status = 1
            continue
        except TypeError as error:
            if not options:
                raise
            # most likely an option this reader does not take
            print(f"{parser.prog} stats: error: {spec}: {error}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps(result, indent=args.indent), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
