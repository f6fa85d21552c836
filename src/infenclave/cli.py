"""The `infenclave` command line: parse arguments, call the library, map errors in one place.

Every deliberate failure is an `InfenclaveError`: `main()` prints it as one line on stderr and
exits with the code `infenclave.errors.exit_code_for` gives it, the same table for every
command (README.md, "Exit codes"). Anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import typer

from infenclave.errors import ExitCode, InfenclaveError, exit_code_for

if TYPE_CHECKING:
    from infenclave.enclave.topk import Prediction
    from infenclave.errors import ImageError

app = typer.Typer(
    name="infenclave",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help, as the CLI library renders it: a flag reads `--json`, not `--json <bool>`.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from infenclave import __version__

        print(f"infenclave {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Confidential image classification by ternary model partitioning.

    Exit codes (every command): 0 ok; 1 internal error (a bug); 2 usage or bad input;
    3 verification refused; 4 no safe cut; 5 server or network error; 6 not enough evidence
    to call a cut safe; 130 interrupted.
    """


# --- commands are registered below; each parses options and calls the library ------------


@app.command()
def attest(
    evidence: Path = typer.Argument(
        ...,
        metavar="EVIDENCE",
        show_default=False,
        help="Evidence file: a raw SGX v3 / TDX v4-v5 DCAP quote, a 1184-byte SEV-SNP report "
        "(vcek.der and ask_ark_milan.pem are looked up beside it), simulated evidence, one "
        "evidence envelope, or a server's whole /v1/attestation answer (every worker checked).",
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
    nonce: str | None = typer.Option(
        None,
        "--nonce",
        help="For a saved /v1/attestation answer: the hex nonce it was asked "
        "with (`curl URL/v1/attestation?nonce=HEX`); each worker's report data must then bind "
        "its key, the model id and this nonce.",
    ),
) -> None:
    """Verify attestation evidence: signatures and chains, then the policy; say why if refused.

    Exit code 0: accepted by the policy (or, without --policy, the cryptographic checks
    passed); 3: refused; 2: bad input (missing file, malformed policy, bad --nonce).
    """
    from infenclave.attest.command import attest_command

    code = attest_command(evidence, collateral, at, policy, as_json, nonce)
    # Not `raise typer.Exit(code)`: main() runs click with standalone_mode=False, where an
    # Exit's code is returned by app() and dropped, so a refusal would exit 0. SystemExit
    # passes through click and carries the code to the shell.
    sys.exit(code)


MODEL_HELP = "Zoo name (efficientnet-lite0, -lite1, -lite2) or path to a model spec YAML."
JSON_RESULTS_HELP = (
    "Print JSON: a list with one {file, predictions: [{index, label, prob}]} "
    "per image, or {file, error} for one that failed."
)


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
        doc = {
            "model": net.model.identity(),
            "input_shape": list(net.input_shape[1:]),
            "cut_points": [c.to_dict() for c in net.cuts],
        }
        print(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{net.model.name}: {len(net.cuts)} cut points (input {'x'.join(map(str, net.input_shape[1:]))})"
    )
    for col in ("#", "cut point", "IR shape", "before: params", "before: MFLOPs", "after: params", "after: MFLOPs"):
        table.add_column(col, justify="left" if col in ("cut point", "IR shape") else "right")
    for c in net.cuts:
        table.add_row(
            str(c.index),
            c.name,
            "x".join(map(str, c.shape)),
            _mib(c.front_param_bytes),
            f"{c.front_flops / 1e6:,.1f}",
            _mib(c.back_param_bytes),
            f"{c.back_flops / 1e6:,.1f}",
        )
    Console(width=120).print(table)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


@app.command()
def predict(
    model: str = typer.Argument(..., help=MODEL_HELP),
    images: list[Path] = typer.Argument(..., help="Image files (JPEG, PNG, ...).", show_default=False),
    top: int = typer.Option(5, "--top", "-k", min=1, max=1000, help="How many classes to show."),
    as_json: bool = typer.Option(False, "--json", help=JSON_RESULTS_HELP),
) -> None:
    """Plain, non-confidential prediction: the baseline every confidential result is compared to.

    A file that cannot be read or decoded is named on stderr and the others are still
    classified; the exit code is then 2."""
    from infenclave.errors import ImageError
    from infenclave.models import load_model
    from infenclave.predict import Predictor, read_image_file

    predictor = Predictor(load_model(model))
    results: list[list[Prediction] | ImageError] = []
    for path in images:
        try:
            results.append(predictor.predict(read_image_file(path), top))
        except ImageError as exc:
            results.append(exc)
    sys.exit(_print_results(images, results, as_json))


def _print_results(paths: list[Path], results: list[list[Prediction] | ImageError], as_json: bool) -> int:
    """Print per-file results (failures on stderr too); the exit code: 2 if any file failed."""
    import json

    docs: list[dict[str, Any]] = []
    for path, result in zip(paths, results):
        if isinstance(result, InfenclaveError):
            message = str(result) if str(path) in str(result) else f"{path}: {result}"
            print(f"error: {message}", file=sys.stderr)
            docs.append({"file": str(path), "error": str(result)})
        else:
            docs.append({"file": str(path), "predictions": [p.to_dict() for p in result]})
    if as_json:
        print(json.dumps(docs, indent=2))
    else:
        for doc in docs:
            if "predictions" in doc:
                print(doc["file"])
                for p in doc["predictions"]:
                    print(f"  {p['prob']:7.2%}  {p['label']}  [{p['index']}]")
    failed = sum(1 for doc in docs if "error" in doc)
    if failed and len(docs) > 1:
        print(f"error: {failed} of {len(docs)} images could not be classified", file=sys.stderr)
    return ExitCode.USAGE if failed else ExitCode.OK


@app.command(context_settings={"allow_extra_args": True})
def assess(
    ctx: typer.Context,
    model: str = typer.Argument(..., help=MODEL_HELP),
    images: list[Path] = typer.Option(
        [],
        "--images",
        "-i",
        show_default=False,
        metavar="DIR|FILE...",
        help="Sample photos: a folder (its image files) or files, e.g. `--images photos/*.jpg`. "
        "Default: the 8 built-in photos.",
    ),
    out: Path = typer.Option(
        Path("assessment"),
        "--out",
        "-o",
        help="Output folder: plan.json, exposure.csv, report.html. Must not exist unless --force.",
    ),
    oracle: str | None = typer.Option(
        None,
        "--oracle",
        help="Model that judges the projected feature maps (same input size and labels). Default: MODEL itself.",
    ),
    full: bool = typer.Option(
        False,
        "--full",
        help="Compute every channel of every cut point "
        "(default: stop a cut point at its first revealing channel and the "
        "scan two cut points after the recommended one).",
    ),
    tail_start: str | None = typer.Option(
        None,
        "--tail-start",
        help="Cut point where the Tail starts. Default: the last feature map before the classifier head.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the channel order in early-stop mode."),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing --out folder (only an empty one or an earlier assessment)."
    ),
    adversary: str = typer.Option(
        "knows-weights",
        "--adversary",
        help="Who you defend against. knows-weights: the FrontNet weights are known (public or "
        "fine-tuned from public weights): white-box inversion. surrogate-weights: the FrontNet is "
        "secret but fine-tuned from a public zoo model: white-box inversion through the public "
        "weights. chosen-inputs: weights secret, "
        "but the attacker can submit its own images and see the IRs: a trained inverse network. "
        "passive: weights secret, no queries: the KL method alone.",
    ),
    judge: str | None = typer.Option(
        None,
        "--judge",
        help="Independent network that judges "
        "whether a reconstruction is recognisable. Default: another "
        "zoo model than MODEL.",
    ),
    whitebox_steps: int | None = typer.Option(
        None, "--whitebox-steps", min=1, help="Adam steps of the white-box inversion per cut."
    ),
    decoder_epochs: int | None = typer.Option(
        None, "--decoder-epochs", min=1, help="Training epochs of the inverse network per cut."
    ),
    whitebox_restarts: int | None = typer.Option(
        None,
        "--whitebox-restarts",
        min=1,
        help="White-box restarts per cut (seeds and loss formulations alternate; the best per photo is kept).",
    ),
    attack_images: list[Path] = typer.Option(
        [],
        "--attack-images",
        show_default=False,
        metavar="DIR|FILE...",
        help="Photos the attacks are scored on. Default: the offline evaluation set (40 photos).",
    ),
    max_recovery: float = typer.Option(
        0.10,
        "--max-recovery",
        help="A cut is safe only when the "
        "one-sided 95% upper bound on the share of photos an attack "
        "recovers is at most this (0.10 needs 29 photos, none recovered).",
    ),
    jobs: int | None = typer.Option(
        None,
        "--jobs",
        "-j",
        min=1,
        help="Attack processes side by side, one thread each (default: the cores this process may "
        "use; 1: in this process). Results do not depend on it.",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the interrupted assessment in --out: run only the attack tasks it had not "
        "finished. Refused when the options differ from the interrupted run's.",
    ),
    ray: bool = typer.Option(
        False,
        "--ray",
        help="Run the attack tasks on Ray (pip install 'infenclave[ray]'): a private local Ray on "
        "127.0.0.1, shut down at the end, unless --ray-address.",
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Existing Ray cluster for the attack tasks (implies --ray), e.g. 10.0.0.5:6379."
    ),
) -> None:
    """Assess how much each cut point's intermediate representation reveals about the input
    (KL-oracle method, then real inversion attacks under --adversary) and recommend where the
    FrontNet ends.

    Every feature map of a cut point is projected to an image and classified by the oracle; the
    cut point is safe for a photo when no map's prediction comes closer to the model's own
    (in KL) than a uniform guess does. The recommended FrontNet end is the first cut point safe
    for every photo. Under an adversary that can attack (the default, knows-weights), a cut is
    safe only when, in addition, no inversion attack recovers a photo that an independent judge
    network recognises. Ctrl-C stops cleanly and writes what is done, marked partial;
    --resume continues it. The attacks run as independent, seeded tasks: --jobs processes, or
    Ray with --ray, with the same results.

    Exit code 0: plan written with a safe partition; 2: bad input; 4: no cut point is safe;
    6: not enough evidence to call one safe (attack more photos); with 4 and 6 the plan and
    report are still written and recommend the whole model in the enclave
    (`infenclave partition --plan` follows it); 130: interrupted (a partial plan is written).
    """
    from infenclave.assess.command import AssessOptions, outcome_error, rich_progress, run_assess
    from infenclave.assess.plan import VERDICT_NO_SAFE_CUT, VERDICT_NOT_ENOUGH
    from infenclave.errors import NotEnoughEvidence, UnsafeVerdict, UsageError

    extra = [Path(a) for a in ctx.args]
    if extra and not images:
        raise UsageError(f"unexpected argument(s): {' '.join(ctx.args)} (images go after --images)")
    opts = AssessOptions(
        model=model,
        images=[*images, *extra] or None,
        out=out,
        oracle=oracle,
        full=full,
        tail_start=tail_start,
        seed=seed,
        force=force,
        adversary=adversary,
        judge=judge,
        whitebox_steps=whitebox_steps,
        decoder_epochs=decoder_epochs,
        whitebox_restarts=whitebox_restarts,
        attack_images=list(attack_images) or None,
        max_recovery=max_recovery,
        jobs=jobs,
        ray=ray or ray_address is not None,
        ray_address=ray_address,
        resume=resume,
    )
    with rich_progress() as progress:
        outcome = run_assess(opts, progress=progress, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    plan = outcome.plan
    rec = plan["recommendation"]
    print(f"adversary     {plan['adversary']['name']}")
    print(f"verdict       {rec['verdict']} ({rec['deployment']})")
    print(f"FrontNet end  {rec['front_end'] or '(none)'}")
    print(f"Tail start    {rec['tail_start']}")
    print(f"written       {outcome.out}/plan.json, exposure.csv, report.html ({outcome.seconds:.0f} s)")
    if outcome.partial:
        print("interrupted: the plan and report are PARTIAL", file=sys.stderr)
        sys.exit(ExitCode.INTERRUPTED)
    if rec["verdict"] in (VERDICT_NO_SAFE_CUT, VERDICT_NOT_ENOUGH):
        verdict_error = NotEnoughEvidence if rec["verdict"] == VERDICT_NOT_ENOUGH else UnsafeVerdict
        raise verdict_error(f"{rec['verdict']}: {rec['reason']} The plan and report are in {outcome.out}.")
    error = outcome_error(outcome)
    if error is not None:
        raise error


# --- serving: partition, serve, classify, demo (see docs/serving.md) -----------------------


@app.command()
def partition(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Bundle directory to write (BUNDLE). The owner's "
        "BUNDLE.key (mode 0600) and BUNDLE.policy.json go beside it.",
    ),
    plan: Path | None = typer.Option(
        None,
        "--plan",
        help="plan.json from `infenclave assess`: its chosen FrontNet end and Tail start, or, "
        "when it recommends the whole model in the enclave, a whole-model bundle.",
    ),
    front_end: str | None = typer.Option(
        None, "--front-end", help="Cut point where the FrontNet ends (overrides the plan)."
    ),
    tail_start: str | None = typer.Option(
        None, "--tail-start", help="Cut point where the Tail starts (overrides the plan)."
    ),
    mrenclave: list[str] = typer.Option(
        [], "--mrenclave", help="SGX MRENCLAVE (hex) of the Gramine build to accept in the starter policy; repeatable."
    ),
    mrsigner: list[str] = typer.Option(
        [], "--mrsigner", help="SGX MRSIGNER (hex) to accept in the starter policy; repeatable."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle, key and policy."),
    unverified_backnet: bool = typer.Option(
        False,
        "--unverified-backnet",
        help="Write a manifest whose BackNet the enclave does NOT "
        "verify (for BackNets with ops the verifier does not cover): the host can then forge IR2.",
    ),
    whole_model: bool = typer.Option(
        False,
        "--whole-model",
        help="No split: the whole model, encrypted, runs in the enclave and no IR leaves it "
        "(what a plan recommends when no cut is safe).",
    ),
) -> None:
    """Split MODEL into a bundle: encrypted FrontNet and Tail, clear BackNet, a manifest.

    With --whole-model, or a --plan that recommends it: one encrypted part, the whole model,
    and no BackNet (the host runs nothing; the enclave pays every FLOP).

    FrontNet and Tail (with the label list) are encrypted under a fresh 256-bit model key
    (AES-256-GCM, the manifest hash as associated data); the manifest holds the SHA-256 of
    every part and no label names. Writes BUNDLE/, BUNDLE.key (the model key, mode 0600: keep it; provision it with
    `infenclave classify --provision`) and BUNDLE.policy.json (a starter client policy that
    accepts this release's enclave measurement and refuses simulation).
    """
    from infenclave.bundle import partition as do_partition
    from infenclave.bundle import read_plan
    from infenclave.errors import UsageError
    from infenclave.models import load_model

    if whole_model and (plan is not None or front_end is not None or tail_start is not None):
        raise UsageError("--whole-model takes no --plan, --front-end or --tail-start: there is no cut")
    loaded = load_model(model)
    if plan is not None and (front_end is None or tail_start is None):
        choice = read_plan(plan, loaded.weights_sha256)
        if choice.whole_model and front_end is None and tail_start is None:
            whole_model = True
            print(f"plan        {choice.verdict}: the whole model in the enclave. {choice.reason}")
        elif choice.whole_model:
            raise UsageError(
                f"{plan} recommends the whole model in the enclave ({choice.verdict}): give both "
                "--front-end and --tail-start to choose a split anyway, or neither"
            )
        else:
            front_end = front_end or choice.front_end
            tail_start = tail_start or choice.tail_start
    if not whole_model and (front_end is None or tail_start is None):
        raise UsageError("give --plan, --whole-model, or both --front-end and --tail-start")
    result = do_partition(
        loaded,
        front_end,
        tail_start,
        out,
        mrenclave=tuple(mrenclave),
        mrsigner=tuple(mrsigner),
        force=force,
        unverified_backnet=unverified_backnet,
        whole_model=whole_model,
    )
    print(f"bundle      {result.bundle_dir}  (model id {result.model_id}, {result.deployment})")
    if result.front_end is None:
        print(
            f"parts       the whole model {result.part_sizes['model']:,} B (encrypted, with labels); "
            "no BackNet: the host runs nothing and no IR leaves the enclave"
        )
    else:
        print(
            f"parts       FrontNet ..{result.front_end} {result.part_sizes['frontnet']:,} B (encrypted), "
            f"BackNet {result.part_sizes['backnet']:,} B (clear), "
            f"Tail {result.tail_start}.. {result.part_sizes['tail']:,} B (encrypted, with labels)"
        )
    if result.cost is not None:
        print(f"cost        {_enclave_cost_line(result.cost)}")
    print(f"model key   {result.key_file}  (mode 0600; never upload it)")
    print(f"policy      {result.policy_file}  (sim measurement {result.sim_measurement})")
    from infenclave.models.zoo import ZOO

    if loaded.source in ZOO and result.front_end is not None:
        # Measured: with the public Lite0 head the host named the top-1 label of 8/8 photos
        # from IR2 alone. Encrypting public layers hides nothing from whoever has the weights.
        print(
            f"warning: {model}'s weights are public: the host can run the Tail ({result.tail_start} "
            "onwards) itself and learn every label from IR2. To keep labels confidential, "
            "fine-tune the Tail privately, or move the cut with --tail-start so that the host "
            "cannot reproduce what follows.",
            file=sys.stderr,
        )


def _enclave_cost_line(cost: dict[str, int]) -> str:
    """What the enclave computes and holds per image, against the whole model."""
    flops, params = cost["enclave_flops"], cost["enclave_param_bytes"]
    return (
        f"in the enclave per image: {flops / 1e6:,.1f} of {cost['total_flops'] / 1e6:,.1f} MFLOPs "
        f"({flops / max(1, cost['total_flops']):.0%}), {_mib(params)} of "
        f"{_mib(cost['total_param_bytes'])} of parameters ({params / max(1, cost['total_param_bytes']):.0%})"
    )


@app.command()
def serve(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `infenclave partition`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8443, "--port", help="TCP port."),
    tee: str = typer.Option(
        "sim", "--tee", help="Enclave backend: sim (a sandboxed local process, simulated evidence) or gramine-sgx."
    ),
    workers: int = typer.Option(2, "--workers", min=1, max=64, help="Enclave worker processes."),
    device: str = typer.Option("cpu", "--device", help="Where the BackNet runs: cpu or cuda."),
    state: Path | None = typer.Option(
        None,
        "--state",
        help="State directory (sealed model key, sim backend secrets). Default: BUNDLE.state beside the bundle.",
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="TLS certificate (PEM). Optional: requests are end-to-end encrypted anyway."
    ),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="TLS private key (PEM)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Largest BackNet batch."),
    enclave_threads: int = typer.Option(
        1, "--enclave-threads", min=0, help="ONNX Runtime threads per enclave worker (0: all cores)."
    ),
    backnet_threads: int = typer.Option(
        0, "--backnet-threads", min=0, help="ONNX Runtime threads of the BackNet (0: all cores)."
    ),
    timeout: float = typer.Option(60.0, "--timeout", help="Per-request deadline, seconds."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    log_format: str = typer.Option(
        "text",
        "--log-format",
        help="text (one line per record) or json (one object per line: time, level, logger, message).",
    ),
    gramine_dir: Path | None = typer.Option(
        None,
        "--gramine-dir",
        help="--tee gramine-sgx: the "
        "folder with the signed manifest (deploy/gramine); "
        "the bundle must be visible there as bundles/NAME.",
    ),
    worker_start_timeout: float | None = typer.Option(
        None,
        "--worker-start-timeout",
        min=1.0,
        help="Seconds an enclave worker may take to start (default: 60 sim, 300 gramine-sgx).",
    ),
    keyserver: str | None = typer.Option(
        None,
        "--keyserver",
        help="URL of the owner's key-release service (`infenclave "
        "keyserver`): workers that start without the model key get it from there, attested.",
    ),
    max_pixels: int = typer.Option(
        24_000_000,
        "--max-pixels",
        min=1,
        help="Images over this many pixels are refused from "
        "their header, before decoding (the enclave's own cap, 64000000, cannot be raised).",
    ),
    worker_memory: str = typer.Option(
        "1536M",
        "--worker-memory",
        help="Memory limit per enclave worker (cgroup v2 memory.max, "
        "or v1 memory.limit_in_bytes); 0: none. Units K, M, G.",
    ),
    header_timeout: float = typer.Option(
        10.0,
        "--header-timeout",
        min=0.1,
        help="Seconds a client has to send a request head; slower connections are answered 408 and closed.",
    ),
    enclaves: list[str] | None = typer.Option(
        None,
        "--enclave",
        help="HOST:PORT of an enclave started elsewhere with `python -m "
        "infenclave.enclave --listen HOST:PORT` (repeatable): served besides the local workers.",
    ),
    ray: bool = typer.Option(
        False,
        "--ray",
        help="Run on Ray Serve (install infenclave[ray]): an HTTP ingress, enclave replicas on nodes "
        "with the --ray-tee-resource (each starts one enclave program that gets the model key from "
        "--keyserver, required), a batched BackNet. Without --ray-address, a one-machine cluster on --host.",
        rich_help_panel="Ray Serve",
    ),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        help="Join this Ray cluster (e.g. 10.0.0.1:6379) instead of starting one here.",
        rich_help_panel="Ray Serve",
    ),
    ray_enclaves: int = typer.Option(
        2,
        "--ray-enclaves",
        min=1,
        help="Enclave replicas (the autoscaling floor with --ray-max-enclaves).",
        rich_help_panel="Ray Serve",
    ),
    ray_max_enclaves: int | None = typer.Option(
        None,
        "--ray-max-enclaves",
        min=1,
        help="Autoscale the enclave replicas up to this many (by requests in flight).",
        rich_help_panel="Ray Serve",
    ),
    ray_backnet_replicas: int = typer.Option(
        1, "--ray-backnet-replicas", min=1, help="BackNet replicas.", rich_help_panel="Ray Serve"
    ),
    ray_backnet_gpus: float = typer.Option(
        0.0,
        "--ray-backnet-gpus",
        min=0.0,
        help="GPUs per BackNet replica (with --device cuda); 0: the BackNet runs on CPU.",
        rich_help_panel="Ray Serve",
    ),
    ray_tee_resource: str = typer.Option(
        "tee",
        "--ray-tee-resource",
        help="The Ray custom resource an enclave replica needs: nodes with a TEE declare it "
        "(ray start --resources '{\"tee\": N}').",
        rich_help_panel="Ray Serve",
    ),
) -> None:
    """Serve BUNDLE: N enclave workers behind an HTTP API; the host runs the BackNet.

    Endpoints: evidence, provisioning, classification, /healthz, /metrics, OpenAPI at /docs.
    The host only ever relays ciphertext, IR1 and IR2; enclave workers that die are restarted
    and unseal the model key themselves."""
    from infenclave.errors import UsageError
    from infenclave.host.server import ServerConfig, run_server

    if tee not in ("sim", "gramine-sgx"):
        raise UsageError(f"--tee must be sim or gramine-sgx, not {tee!r}")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, not {device!r}")
    from infenclave.host.backnet import check_device
    from infenclave.host.logs import LOG_FORMATS, LOG_LEVELS

    check_device(device)  # before anything starts: a CPU-only build refuses cuda here
    if log_level not in LOG_LEVELS:
        raise UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")
    if log_format not in LOG_FORMATS:
        raise UsageError(f"--log-format must be text or json, not {log_format!r}")
    if tee == "gramine-sgx" and gramine_dir is None:
        raise UsageError(
            "--tee gramine-sgx needs --gramine-dir (the folder with the signed "
            "infenclave-enclave manifest; see deploy/gramine)"
        )
    if not (bundle / "manifest.json").is_file():
        raise UsageError(f"{bundle} is not a bundle directory (no manifest.json)")
    state_dir = state or bundle.with_name(bundle.name + ".state")
    from infenclave.host.cgroup import parse_size

    try:
        memory = None if worker_memory.strip() in ("0", "") else parse_size(worker_memory)
    except ValueError as exc:
        raise UsageError(f"--worker-memory: {exc}") from exc
    config = ServerConfig(
        bundle_dir=bundle,
        state_dir=state_dir,
        tee=tee,
        workers=workers,
        device=device,
        enclave_threads=enclave_threads,
        backnet_threads=backnet_threads,
        max_batch=max_batch,
        request_timeout=timeout,
        gramine_dir=gramine_dir,
        worker_start_timeout=worker_start_timeout,
        keyserver=keyserver,
        remote_enclaves=tuple(enclaves or ()),
        max_pixels=max_pixels,
        worker_memory=memory,
        header_timeout=header_timeout,
    )
    if ray:
        _serve_ray(
            config,
            host=host,
            port=port,
            address=ray_address,
            enclaves=ray_enclaves,
            max_enclaves=ray_max_enclaves,
            backnet_replicas=ray_backnet_replicas,
            backnet_gpus=ray_backnet_gpus,
            tee_resource=ray_tee_resource,
            tls=tls_cert is not None,
        )
        return
    run_server(
        config, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, log_level=log_level, log_format=log_format
    )


def _serve_ray(config: Any, *, host: str, port: int, address: str | None, tls: bool, **options: Any) -> None:
    """`serve --ray`: check what Ray mode needs, then hand over to `host.ray_serve`."""
    from infenclave.errors import UsageError

    try:
        import ray  # noqa: F401 - only to say clearly that the extra is missing
    except ImportError:
        raise UsageError("--ray needs Ray Serve: install infenclave[ray]") from None
    if not config.keyserver:
        raise UsageError("--ray needs --keyserver URL: enclave replicas get the model key from the key server")
    if config.remote_enclaves:
        raise UsageError("--ray and --enclave do not mix: under Ray the enclave replicas start their own enclaves")
    if tls:
        raise UsageError("--ray serves plain HTTP through Serve's proxy (the requests are end-to-end encrypted)")
    from infenclave.host.ray_serve import RayOptions, run_ray

    run_ray(config, RayOptions(**options), host=host, port=port, address=address)


@app.command()
def classify(
    images: list[Path] = typer.Argument(..., help="Image files (JPEG, PNG, ...).", show_default=False),
    url: str = typer.Option(..., "--url", help="Server URL, e.g. http://127.0.0.1:8443"),
    policy: Path = typer.Option(
        ..., "--policy", help="Client policy (JSON or YAML), e.g. BUNDLE.policy.json from `infenclave partition`."
    ),
    provision: Path | None = typer.Option(
        None,
        "--provision",
        help="Model owner: provision this model key file (BUNDLE.key) to the attested enclave first.",
    ),
    allow_simulation: bool = typer.Option(
        False, "--allow-simulation", help="Accept the sim backend (NO hardware protection; development only)."
    ),
    top: int = typer.Option(5, "--top", "-k", min=1, max=100, help="How many classes to show."),
    as_json: bool = typer.Option(False, "--json", help=JSON_RESULTS_HELP + " The shape of `predict --json`."),
    cacert: Path | None = typer.Option(
        None, "--cacert", help="CA bundle to check the server's TLS certificate (https URLs)."
    ),
) -> None:
    """Classify images confidentially, end to end encrypted to an attested enclave.

    Verifies every enclave's evidence against POLICY first and refuses, with the reason,
    before sending anything; optionally provisions the model key (--provision); then sends
    each image sealed to an attested enclave and prints its top-k. A file that cannot be read
    or that the enclave refuses is named on stderr and the others are still classified; the
    exit code is then 2."""
    import warnings

    from infenclave.client import Client, SimulationWarning

    if allow_simulation:
        print(
            "warning: --allow-simulation: accepting a SIMULATED enclave, which has no hardware "
            "protection; for development only",
            file=sys.stderr,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)  # printed above, once per run
        client = Client(url, policy, allow_simulation=allow_simulation, verify_tls=str(cacert) if cacert else True)
    with client:
        enclaves = client.attest()
        print(
            f"attested {len(enclaves)} enclave(s): tee {enclaves[0].claims.tee}, "
            f"measurement ok, model {client.model_id}",
            file=sys.stderr,
        )
        if provision is not None:
            ready = client.provision(provision)
            print(f"model key provisioned; {ready} worker(s) hold it", file=sys.stderr)
        results = client.classify_batch(images, k=top, return_image_errors=True)
    sys.exit(_print_results(images, results, as_json))


@app.command()
def keyserver(
    key_file: Path = typer.Argument(..., help="The owner's model key file (BUNDLE.key)."),
    policy: Path = typer.Option(
        ..., "--policy", help="Policy an enclave must satisfy (the client policy format; it must name the model)."
    ),
    listen: str = typer.Option("127.0.0.1:8444", "--listen", help="HOST:PORT to listen on."),
    audit_log: Path | None = typer.Option(
        None, "--audit-log", help="Append one JSON line per release and refusal to this file."
    ),
    allow_simulation: bool = typer.Option(
        False, "--allow-simulation", help="Release to the sim backend (NO hardware protection; development only)."
    ),
    nonce_ttl: float = typer.Option(
        60.0, "--nonce-ttl", min=0.1, help="Seconds a challenge nonce stays valid (single use)."
    ),
    rate_burst: int = typer.Option(10, "--rate-burst", min=1, help="Requests a peer may make at once (token bucket)."),
    rate_per_s: float = typer.Option(1.0, "--rate", min=0.001, help="Requests per second a peer's bucket refills."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Attested key release: hand the model key, HPKE-sealed, to enclaves whose evidence passes
    POLICY (challenge nonce, evidence binding the enclave key, the nonce and the model)."""
    from infenclave.errors import UsageError
    from infenclave.keyserver import KeyServerConfig, run_keyserver

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--listen must be HOST:PORT, not {listen!r}")
    if allow_simulation:
        print(
            "warning: --allow-simulation: releasing the model key to SIMULATED enclaves, which "
            "have no hardware protection; for development only",
            file=sys.stderr,
        )
    config = KeyServerConfig(
        key_file=key_file,
        policy=policy,
        allow_simulation=allow_simulation,
        audit_log=audit_log,
        nonce_ttl_s=nonce_ttl,
        rate_burst=rate_burst,
        rate_per_s=rate_per_s,
    )
    run_keyserver(config, host=host.strip("[]"), port=int(port), log_level=log_level)


@app.command()
def demo(
    workdir: Path = typer.Option(
        Path("demo-out"),
        "--workdir",
        help="Where the plan, bundle, key, policy and server state are written (replaced).",
    ),
    model: str = typer.Option("efficientnet-lite0", "--model", help=MODEL_HELP),
    workers: int = typer.Option(2, "--workers", min=1, help="Enclave workers."),
    front_end: str | None = typer.Option(None, "--front-end", help="Skip the assessment: FrontNet end."),
    tail_start: str | None = typer.Option(None, "--tail-start", help="Skip the assessment: Tail start."),
) -> None:
    """Assess, partition, serve (sim), attest, provision and classify the built-in photos.

    Prints each confidential top-5 beside `infenclave predict`'s (they must agree), the
    latency and where each part ran; then stops the server. Exit 0 only if all agree."""
    from infenclave.demo import run_demo

    sys.exit(run_demo(workdir=workdir, model_ref=model, workers=workers, front_end=front_end, tail_start=tail_start))


def main() -> None:
    """Console-script entry point: one clear line and the table's exit code for every
    deliberate error (`infenclave.errors.ExitCode`)."""
    from typer._click.exceptions import ClickException  # typer vendors its own click

    _warnings_as_lines()
    try:
        code = app(standalone_mode=False)
    except InfenclaveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exit_code_for(exc))
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        sys.exit(ExitCode.INTERRUPTED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except ClickException as exc:  # usage errors: unknown option, missing argument, bad value
        exc.show()
        sys.exit(ExitCode.USAGE)
    sys.exit(code if isinstance(code, int) else ExitCode.OK)


def _warnings_as_lines() -> None:
    """Our own warnings print as `warning: ...`, one line, without a source location."""
    import warnings

    default = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if category.__module__.startswith("infenclave"):
            print(f"warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


if __name__ == "__main__":
    main()
