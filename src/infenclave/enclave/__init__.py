"""The enclave program: the trusted computing base. Keep this file free of imports."""
