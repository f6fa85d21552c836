"""A stored sealed model key that no longer opens: the server starts and asks for provisioning.

On SGX the sealing key (``_sgx_mrenclave``) changes with every rebuild (MRENCLAVE) and with a
TCB or microcode update (CPUSVN, ISVSVN, CONFIGSVN): the blob the host stored then never
opens again. Before, the worker was killed and restarted for ever and ``serve`` never
finished starting, so the owner could not even provision again. Here the same situation is
made real with the ``sim`` backend: a blob sealed under *another measurement* (what a rebuilt
enclave sees) is put where the host keeps the sealed key, and a real server is started.
"""

from __future__ import annotations

from pathlib import Path

from infenclave.bundle import read_key_file
from infenclave.enclave.program import _seal_label
from infenclave.enclave.sealing import SimSealer
from test_serving_support import ServerProcess, make_bundle, sim_client

MODEL = "efficientnet-lite0"


def test_unopenable_sealed_key_is_set_aside_and_owner_provisions_again(tmp_path, photos) -> None:
    bundle = make_bundle(MODEL)
    key = read_key_file(bundle.key)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    # Same installation secret, other measurement: exactly what a rebuilt enclave faces.
    stale = SimSealer(state, b"\x01" * 32).seal(key.key, _seal_label(key.model_id))
    sealed_path = state / f"model-key-{key.model_id}.sealed"
    sealed_path.write_bytes(stale)

    server = ServerProcess(bundle.bundle, workers=2, extra=("--state", str(state)))
    try:
        # serve finished starting: both workers up (not restarting), none holds the key.
        health = server.wait_ready(lambda h: h["workers"] == 2)
        assert health["status"] == "reprovision_needed", health
        assert health["workers_ready"] == 0 and health["provisioned"] is False
        assert "provision the model key again" in health["reprovision_needed"]
        assert "provision the model key again" in server.log()
        assert "restarting" not in server.log()
        # The old blob is kept beside, not deleted (a rollback to the old build could use it).
        aside = list(state.glob(f"model-key-{key.model_id}.sealed.unopenable-*"))
        assert not sealed_path.exists() and len(aside) == 1 and aside[0].read_bytes() == stale

        with sim_client(server.url, bundle.policy) as client:
            assert client.provision(bundle.key) == 2
            predictions = client.classify(Path(photos["chelsea"]).read_bytes(), k=5)
        assert len(predictions) == 5
        health = server.health()
        assert health["status"] == "ok" and health["reprovision_needed"] is None
        assert sealed_path.exists() and sealed_path.read_bytes() != stale
    except BaseException:
        print(server.log())
        raise
    finally:
        server.stop()
