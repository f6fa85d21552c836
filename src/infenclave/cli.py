"""The `infenclave` command line: parse arguments, call the library, map errors in one place.

Every deliberate failure is an `InfenclaveError`: `main()` prints it as one line on stderr and
exits 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

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


@app.command()
def attest(
    evidence: Path = typer.Argument(
        ...,
        metavar="EVIDENCE",
        show_default=False,
        help="Evidence file: a raw SGX v3 / TDX v4-v5 DCAP quote, a 1184-byte SEV-SNP report "
        "(vcek.der and ask_ark_milan.pem are looked up beside it), simulated evidence, or the "
        "JSON envelope a server returns.",
    ),
    collateral: Path | None = typer.Option(
        None,
        "--collateral",
        help="SGX/TDX: dcap-qvl collateral JSON (CRLs, TCB info, QE identity); without it only "
        "the quote's own chain is checked and no policy accepts it. SEV-SNP: PEM bundle of "
        "VCEK, ASK, ARK.",
    ),
    at: str | None = typer.Option(
        None,
        "--at",
        help="Verification time, ISO-8601 (e.g. 2025-06-19T11:56:11Z; no zone means UTC). "
        "Default: now. Collateral expires, so archived evidence needs its time.",
    ),
    policy: Path | None = typer.Option(
        None,
        "--policy",
        help="Policy file (JSON or YAML). Without it only the cryptographic checks run and "
        "the claims are printed: nothing is accepted.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the verdict and claims as JSON."),
) -> None:
    """Verify attestation evidence: signatures and chains, then the policy; say why if refused.

    Exit code 0: accepted by the policy (or, without --policy, the cryptographic checks
    passed); 1: refused; 2: bad input (missing file, malformed policy or evidence).
    """
    from infenclave.attest.command import attest_command

    code = attest_command(evidence, collateral, at, policy, as_json)
    # Not `raise typer.Exit(code)`: main() runs click with standalone_mode=False, where an
    # Exit's code is returned by app() and dropped, so a refusal would exit 0. SystemExit
    # passes through click and carries the code to the shell.
    sys.exit(code)


MODEL_HELP = "Zoo name (efficientnet-lite0, -lite1, -lite2) or path to a model spec YAML."


@app.command()
def inspect(
    model: str = typer.Argument("efficientnet-lite0", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """List every valid cut point of MODEL, in order, with the cost on each side.

    A cut point is a tensor that everything after it depends on alone: on residual networks
    only the boundaries between blocks, never inside a skip connection.
    """
    import json

    from infenclave.models import load_model
    from infenclave.network import analyse

    net = analyse(load_model(model))
    if as_json:
        doc = {"model": net.model.identity(), "input_shape": list(net.input_shape[1:]),
               "cut_points": [c.to_dict() for c in net.cuts]}
        print(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{net.model.name}: {len(net.cuts)} cut points "
                        f"(input {'x'.join(map(str, net.input_shape[1:]))})")
    for col in ("#", "cut point", "IR shape", "before: params", "before: MFLOPs",
                "after: params", "after: MFLOPs"):
        table.add_column(col, justify="left" if col in ("cut point", "IR shape") else "right")
    for c in net.cuts:
        table.add_row(str(c.index), c.name, "x".join(map(str, c.shape)),
                      _mib(c.front_param_bytes), f"{c.front_flops / 1e6:,.1f}",
                      _mib(c.back_param_bytes), f"{c.back_flops / 1e6:,.1f}")
    Console(width=120).print(table)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


@app.command()
def predict(
    model: str = typer.Argument(..., help=MODEL_HELP),
    images: list[Path] = typer.Argument(..., help="Image files (JPEG, PNG, ...).", show_default=False),
    top: int = typer.Option(5, "--top", "-k", min=1, max=1000, help="How many classes to show."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list per image of {index, label, prob}."),
) -> None:
    """Plain, non-confidential prediction: the baseline every confidential result is compared to."""
    import json

    from infenclave.models import load_model
    from infenclave.predict import predict_files

    results = predict_files(load_model(model), list(images), top)
    if as_json:
        print(json.dumps([[p.to_dict() for p in r] for r in results], indent=2))
        return
    for path, preds in zip(images, results):
        print(f"{path}")
        for p in preds:
            print(f"  {p.prob:7.2%}  {p.label}  [{p.index}]")


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
