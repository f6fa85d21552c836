"""One exception root for everything infenclave raises on purpose.

The CLI maps `InfenclaveError` (and only it) to one clear line on stderr and the exit code
of `exit_code_for`; anything else is a bug and keeps its traceback (exit 1). Subclasses say
which layer refused, and wrap third-party errors with `raise ... from exc` so that the cause
is never lost.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit codes of every `infenclave` command (the table in README.md)."""

    OK = 0
    #: An unexpected error: a bug, reported with its traceback.
    INTERNAL = 1
    #: Usage or bad input: an unknown option, a missing or malformed file, an undecodable image.
    USAGE = 2
    #: Verification refused: evidence or policy, a model the policy does not name, a part or
    #: an answer that fails its integrity check.
    REFUSED = 3
    #: The assessment's verdict: no safe cut point (attacks recovered photos at every cut).
    UNSAFE = 4
    #: The server answered with an error or could not be reached.
    SERVER = 5
    #: The assessment's verdict: nothing was recovered, but too few photos were attacked to
    #: call a cut safe. Unlike 4, more photos (``--attack-images``) may still find one.
    NOT_ENOUGH_EVIDENCE = 6
    #: Interrupted (Ctrl-C); what was done is kept where the command says so.
    INTERRUPTED = 130


class InfenclaveError(Exception):
    """Root of every deliberate infenclave error."""


class UsageError(InfenclaveError):
    """The user asked for something that cannot be done as asked (bad option, missing file)."""


class ModelError(InfenclaveError):
    """A model, model spec or model file is missing, malformed or unsupported."""


class ImageError(InfenclaveError):
    """An image could not be decoded, or is refused by a limit."""


class GraphError(InfenclaveError):
    """A network could not be analysed or cut as asked."""


class AssessmentError(InfenclaveError):
    """The exposure assessment cannot run or cannot reach a recommendation."""


class UnsafeVerdict(AssessmentError):
    """The assessment ran to the end: no cut point is safe, or the evidence is too thin to say."""


class NotEnoughEvidence(UnsafeVerdict):
    """The assessment ran to the end and recovered nothing, but attacked too few photos to call
    a cut safe: a script may attack more photos, where after `UnsafeVerdict` it may not."""


class BundleError(InfenclaveError):
    """A partitioned bundle is malformed, tampered with, or does not match its manifest."""


class IntegrityError(BundleError):
    """A part does not match the hash its manifest records: tampered with, or mixed up."""


class CryptoError(InfenclaveError):
    """A ciphertext failed to open. Deliberately opaque to peers: it names no secret."""


class VerificationError(InfenclaveError):
    """Attestation evidence failed verification or was refused by the policy."""


class PolicyError(InfenclaveError):
    """A verification policy file is malformed or empty."""


class EnclaveError(InfenclaveError):
    """The enclave refused a request or is not available."""


class ServerError(InfenclaveError):
    """The host server answered with an error or could not be reached."""


class WorkerLost(ServerError):
    """The enclave worker serving a request stopped before answering; attest again and retry.

    One definition for both sides: the host raises it when a worker dies mid-request, the
    client when the server answers ``worker_lost``.
    """


class WorkerCrashed(WorkerLost):
    """The worker died of a crash or of its memory limit while it held the request, which may
    be the cause: never retried, so that one hostile image cannot take down a second worker."""


def exit_code_for(exc: InfenclaveError) -> ExitCode:
    """The exit code for a deliberate error (one table for every command)."""
    if isinstance(exc, (VerificationError, CryptoError, IntegrityError)):
        return ExitCode.REFUSED
    if isinstance(exc, NotEnoughEvidence):
        return ExitCode.NOT_ENOUGH_EVIDENCE
    if isinstance(exc, UnsafeVerdict):
        return ExitCode.UNSAFE
    if isinstance(exc, (ServerError, EnclaveError)):
        return ExitCode.SERVER
    return ExitCode.USAGE
