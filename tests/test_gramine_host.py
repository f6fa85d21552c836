"""What the host checks before it starts Gramine workers, and the enclave's image formats.

The SGX program's arguments are measured into the manifest, so the host cannot pass
``--enclave-threads`` to it: it reads the thread count from the rendered manifest and refuses
to start when the two differ (before, a different value was silently ignored). The manifest
here is the real one, rendered as the Makefile renders it.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from infenclave.enclave.imaging import ACCEPTED_FORMATS, decode_image
from infenclave.errors import ImageError, ServerError
from infenclave.host.enclave_pool import GRAMINE_START_TIMEOUT_S, START_TIMEOUT_S, EnclavePool
from infenclave.host.metrics import Metrics
from infenclave.protocol.bundle_format import parse_manifest
from test_gramine_manifest import ROOT, load_trusted_files_module, makefile_defines, render
from test_serving_support import make_bundle


@pytest.fixture(scope="module")
def gramine_dir(tmp_path_factory):
    bundle = make_bundle("efficientnet-lite0")
    trusted = load_trusted_files_module()
    fragment = trusted.render(trusted.collect(trusted.Layout(ROOT / "src")))
    directory = tmp_path_factory.mktemp("gramine")
    (directory / "infenclave-enclave.manifest").write_text(render(fragment, makefile_defines(ENCLAVE_THREADS="2")))
    (directory / "bundles").mkdir()
    (directory / "bundles" / bundle.bundle.name).symlink_to(bundle.bundle)
    return directory, bundle


def _pool(gramine_dir, bundle, threads: int, **kwargs) -> EnclavePool:
    manifest = parse_manifest((bundle.bundle / "manifest.json").read_bytes())
    return EnclavePool(
        bundle_dir=bundle.bundle,
        manifest=manifest,
        state_dir=gramine_dir / "state",
        tee="gramine-sgx",
        workers=1,
        metrics=Metrics(),
        enclave_threads=threads,
        gramine_dir=gramine_dir,
        **kwargs,
    )


def test_enclave_threads_must_match_the_manifest(gramine_dir) -> None:
    directory, bundle = gramine_dir
    pool = _pool(directory, bundle, 2)
    assert pool._start_timeout == GRAMINE_START_TIMEOUT_S > START_TIMEOUT_S
    assert _pool(directory, bundle, 2, start_timeout=900.0)._start_timeout == 900.0
    with pytest.raises(ServerError, match="--enclave-threads 1 differs from the 2"):
        _pool(directory, bundle, 1)


def test_gramine_needs_a_built_manifest(gramine_dir, tmp_path) -> None:
    _, bundle = gramine_dir
    (tmp_path / "bundles").mkdir()
    (tmp_path / "bundles" / bundle.bundle.name).symlink_to(bundle.bundle)
    with pytest.raises(ServerError, match="cannot read --threads"):
        _pool(tmp_path, bundle, 1)


def test_only_the_accepted_image_formats_are_decoded() -> None:
    assert set(ACCEPTED_FORMATS) == {"JPEG", "PNG", "WEBP"}
    for fmt in ACCEPTED_FORMATS:
        out = io.BytesIO()
        Image.new("RGB", (64, 48), (10, 200, 30)).save(out, fmt)
        assert decode_image(out.getvalue()).shape == (48, 64, 3)
    for fmt in ("TIFF", "BMP", "GIF", "PPM"):  # Pillow decodes these; the service does not
        out = io.BytesIO()
        Image.new("RGB", (64, 48)).save(out, fmt)
        with pytest.raises(ImageError, match="not a recognised image file"):
            decode_image(out.getvalue())
