"""The `infenclave` command line: parse arguments, call the library, map errors in one place.

Every deliberate failure is an `InfenclaveError`: `main()` prints it as one line on stderr and
exits 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer

from infenclave.errors import InfenclaveError

app = typer.Typer(
    name="infenclave",
    help="Confidential image classification by ternary model partitioning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- commands are registered below; each parses options and calls the library ------------


def main() -> None:
    """Console-script entry point: one clear line and exit 2 for every deliberate error."""
    try:
        app(standalone_mode=False)
    except InfenclaveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
