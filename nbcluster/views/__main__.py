"""``python -m nbcluster.views``: write the panel's TypeScript types from the view schema.

Without options it rewrites ``labextension/src/views.gen.ts``; ``--ts`` prints the file instead;
``--check`` only reports (exit status 1) whether the checked-in file is out of date.
"""

from __future__ import annotations

import argparse
import sys

from nbcluster.views.typescript import TS_FILE, render


def main(argv: list[str] | None = None) -> int:
    """Write, print or check the generated file; the exit status."""
    p = argparse.ArgumentParser(prog="python -m nbcluster.views", description=__doc__)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ts", action="store_true", help="print the TypeScript to stdout")
    group.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = p.parse_args(argv)
    text = render()
    if args.ts:
        sys.stdout.write(text)
        return 0
    current = TS_FILE.read_text() if TS_FILE.exists() else ""
    if args.check:
        if current != text:
            print(f"{TS_FILE} is out of date: run python -m nbcluster.views", file=sys.stderr)
            return 1
        return 0
    if current != text:
        TS_FILE.write_text(text)
        print(f"wrote {TS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
