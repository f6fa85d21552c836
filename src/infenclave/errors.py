"""One exception root for everything infenclave raises on purpose.

The CLI maps `InfenclaveError` (and only it) to one clear line on stderr and exit code 2;
anything else is a bug and keeps its traceback. Subclasses say which layer refused, and
wrap third-party errors with `raise ... from exc` so that the cause is never lost.
"""

from __future__ import annotations


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


class BundleError(InfenclaveError):
    """A partitioned bundle is malformed, tampered with, or does not match its manifest."""


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
