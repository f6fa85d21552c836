"""Every format both sides of a trust boundary share, in one place.

The enclave program, the untrusted host, the client SDK and the verifier each import the
modules here; nothing here imports any of them (a test checks). So a format has one
definition, and a reviewer of the trusted computing base reads exactly the formats the
enclave parses:

- `frames`: the binary frames on the host <-> enclave channel;
- `messages`: end-to-end message plaintexts and their HPKE contexts (client/owner <-> enclave);
- `bundle_format`: the partitioned model bundle and its manifest;
- `binding`: what an enclave's evidence binds (report data) and the nonce limits;
- `sim_evidence`: the simulated TEE's signed evidence document;
- `measurement`: the ``sim`` measurement, derived from what the enclave program imports;
- `strict_json`: the one strict JSON object reader (duplicate keys refused);
- `envelope`: the evidence envelope the host serves (not imported by the enclave);
- `http`: HTTP header names, paths and error codes (not imported by the enclave).

This ``__init__`` imports nothing, so importing one format never loads another.
"""
