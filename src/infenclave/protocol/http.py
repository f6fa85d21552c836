"""The HTTP API's names: paths, headers, error codes, body limits (host and client).

The enclave never imports this module: it speaks frames, not HTTP. Header names are
case-insensitive on the wire; they are written here in their canonical spelling.
"""

from __future__ import annotations

__all__ = [
    "ATTESTATION_PATH",
    "CLASSIFY_PATH",
    "KEY_HEADER",
    "MAX_PROVISION_BODY",
    "MODEL_HEADER",
    "MODEL_PATH",
    "PROVISION_PATH",
    "REQUEST_ID_HEADER",
    "SEALED_MEDIA_TYPE",
]

ATTESTATION_PATH = "/v1/attestation"
PROVISION_PATH = "/v1/provision"
CLASSIFY_PATH = "/v1/classify"
MODEL_PATH = "/v1/model"

#: Which attested enclave worker a sealed body is for: the hex of its X25519 public key.
KEY_HEADER = "X-Infenclave-Enclave-Key"
#: The client's request id (32 lower-case hex digits); it is also in the HPKE context.
REQUEST_ID_HEADER = "X-Infenclave-Request-Id"
#: The model id (manifest hash) the client expects; the server refuses another.
MODEL_HEADER = "X-Infenclave-Model"
#: Sealed bodies both ways.
SEALED_MEDIA_TYPE = "application/octet-stream"

#: A sealed model key is 32 bytes plus HPKE overhead; anything near a kilobyte is not one.
MAX_PROVISION_BODY = 1024
