#!/bin/sh
# Reproducible build of the infenclave Gramine enclave; prints MRENCLAVE and writes
# build-record.txt (inputs and outputs) to publish with it.
#
#   BASE_IMAGE=debian:bookworm-slim@sha256:<digest> deploy/gramine/build.sh [COMMIT]
#
# The signing key is mounted read-only at sign time, never baked into the image; a client that
# rebuilds to check MRENCLAVE can pass any key (SGX_SIGNER_KEY=...): MRENCLAVE does not depend
# on it, only MRSIGNER does. NOT RUN here (no network, no container runtime).
set -eu

commit=${1:-HEAD}
: "${BASE_IMAGE:?set BASE_IMAGE to a Debian 12 image pinned by digest (name@sha256:...)}"
case "$BASE_IMAGE" in
  *@sha256:*) ;;
  *) echo "refusing: BASE_IMAGE must be pinned by digest, not a tag: $BASE_IMAGE" >&2; exit 1 ;;
esac
SNAPSHOT=${SNAPSHOT:-20250601T000000Z}
GRAMINE_VERSION=${GRAMINE_VERSION:-1.9}
ENCLAVE_THREADS=${ENCLAVE_THREADS:-1}
key=${SGX_SIGNER_KEY:-$HOME/.config/gramine/enclave-key.pem}
root=$(git rev-parse --show-toplevel)
rev=$(git -C "$root" rev-parse "$commit")
image=infenclave-gramine:$rev

# A clean tree of exactly one commit: no uncommitted edits, no bytecode caches.
git -C "$root" archive --format=tar "$rev" src deploy/gramine \
  | docker build --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg SNAPSHOT="$SNAPSHOT" \
      --build-arg GRAMINE_VERSION="$GRAMINE_VERSION" -f deploy/gramine/Dockerfile -t "$image" -

docker run --rm -v "$key:/signing-key.pem:ro" -v "$PWD:/out" "$image" sh -c "
  make VENV=/opt/infenclave/.venv SGX_SIGNER_KEY=/signing-key.pem ENCLAVE_THREADS=$ENCLAVE_THREADS all \
  && cp infenclave-enclave.manifest infenclave-enclave.manifest.sgx infenclave-enclave.sig /out/ \
  && { echo commit=$rev; echo base_image=$BASE_IMAGE; echo snapshot=$SNAPSHOT;
       echo gramine=\$(dpkg-query -W -f='\${Version}' gramine); echo enclave_threads=$ENCLAVE_THREADS;
       cat wheels.sha256; gramine-sgx-sigstruct-view --verbose infenclave-enclave.sig; } > /out/build-record.txt"
cat build-record.txt
