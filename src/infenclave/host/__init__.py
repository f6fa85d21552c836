"""The untrusted host: HTTP server, enclave worker pool, BackNet executor. Never trusted."""
