"""Process sandbox the enclave program applies to itself at start-up (the ``sim`` backend's walls).

Why: under the ``sim`` backend there is no hardware isolation, so the enclave process at
least makes it hard for its own code, once compromised (a malicious image exploiting a
decoder, say), to send decrypted images anywhere, to start another program, or to read
other processes; and makes it hard for other *unprivileged* processes to read its memory.

Call `apply_sandbox` first thing in the enclave's ``__main__`` on the ``sim`` backend: before
importing numpy or onnxruntime (they start threads; a network namespace covers only the
thread that creates it) and before any secret exists. Not under Gramine: there the SGX
enclave is the wall, and Gramine does not implement these system calls. In order it applies:

0. ``ORT_DISABLE_TELEMETRY=1`` in the environment: the onnxruntime 1.32 Linux wheel ships
   Microsoft 1DS telemetry (``mobile.events.data.microsoft.com``) and, unless this is set
   before it is imported, keeps an event database and a device id under
   ``$XDG_CACHE_HOME/Microsoft/DeveloperTools``. Checked on this machine; the telemetry
   holds device and process facts, not inputs, but the TCB must not phone home at all.

1. ``unshare(CLONE_NEWNET)``: a fresh network namespace with only a down loopback. Needs
   CAP_SYS_ADMIN; without it (EPERM), or when the process already has several threads, it
   is skipped and the report says why. Not fatal, because step 4 already refuses the
   sockets that matter.
2. ``prctl(PR_SET_DUMPABLE, 0)``: no core dumps, and no ptrace attach or ``/proc/<pid>/mem``
   access by other processes of the same (non-root) user.
3. ``prctl(PR_SET_NO_NEW_PRIVS, 1)``: no privilege gain through set-uid programs; required
   for an unprivileged seccomp filter.
4. A seccomp filter (default allow, synchronised to every thread) that makes these fail with
   EPERM: ``execve``/``execveat``; ``ptrace``, ``process_vm_readv/writev``, ``pidfd_getfd``;
   ``setns`` (leaving the new network namespace); ``io_uring_*`` (io_uring can open sockets
   and do I/O without the syscalls below being seen); and ``socket()`` for every address
   family except AF_UNIX. The socket rule is an allow-list (``family != AF_UNIX`` is
   refused) rather than a deny-list of AF_INET/AF_INET6: it also refuses AF_VSOCK (not
   network-namespaced), AF_PACKET, AF_NETLINK, and a family with junk in its upper 32 bits
   (the kernel truncates the argument to ``int``, seccomp compares all 64 bits).
   AF_UNIX sockets and ``socketpair`` keep working: the host talks to the enclave over one.

Not protected against, and said so: root (it can read the process's memory through
``/proc/<pid>/mem`` regardless of dumpability, and can ``setns`` from outside); the file
system and path-bound AF_UNIX sockets (no mount namespace or Landlock here); side channels;
file descriptors to network sockets inherited from the parent (the host must not pass any:
``subprocess`` closes them by default).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys
from dataclasses import dataclass

from infenclave.errors import EnclaveError

__all__ = ["DENIED_SYSCALLS", "SandboxReport", "apply_sandbox"]

# <linux/prctl.h>, <linux/sched.h>
_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39
_CLONE_NEWNET = 0x40000000

#: Syscalls that fail with EPERM once the filter is loaded (besides the socket() rule).
DENIED_SYSCALLS: tuple[str, ...] = (
    "execve",
    "execveat",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "setns",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
)


@dataclass(frozen=True)
class SandboxReport:
    """What `apply_sandbox` did, for the enclave's start-up log and for tests.

    ``onnxruntime_telemetry_off`` is False when onnxruntime was imported before the sandbox
    (too late to switch its telemetry off). ``network_namespace`` is False when step 1 was
    skipped; ``network_namespace_error`` then says why (an errno name, or ``"multithreaded"``).
    """

    onnxruntime_telemetry_off: bool
    network_namespace: bool
    network_namespace_error: str | None
    not_dumpable: bool
    no_new_privs: bool
    seccomp_filter: bool
    denied_syscalls: tuple[str, ...]
    allowed_socket_families: tuple[str, ...]
    running_as_root: bool


def _libc() -> ctypes.CDLL:
    # dlopen(NULL): the symbols already loaded into the process, libc's included. Unlike
    # ctypes.util.find_library it starts no helper program (ldconfig) at enclave start-up.
    return ctypes.CDLL(None, use_errno=True)


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def _unshare_network(libc: ctypes.CDLL) -> str | None:
    """Return None when a new network namespace was entered, else the reason it was not."""
    if _thread_count() != 1:
        # unshare() changes the namespace of the calling thread only; other threads would
        # keep the host's network. Reporting "applied" would be a lie.
        return "multithreaded"
    if libc.unshare(ctypes.c_int(_CLONE_NEWNET)) == 0:
        return None
    err = ctypes.get_errno()
    return errno.errorcode.get(err, str(err))


def _prctl(libc: ctypes.CDLL, option: int, arg: int) -> int:
    zero = ctypes.c_ulong(0)
    result = int(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), zero, zero, zero))
    if result < 0:
        err = ctypes.get_errno()
        raise EnclaveError(f"prctl({option}) failed: {os.strerror(err)}")
    return result


def _load_seccomp_filter() -> None:
    # Imported here, not at module level: pyseccomp locates libseccomp by running ldconfig
    # at import, which must happen before execve is refused, and which cannot happen at all
    # under Gramine (where this sandbox is not used: the SGX enclave is the wall there).
    import pyseccomp  # type: ignore[import-untyped]  # (no stubs, no py.typed)

    flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    # Apply to every thread of the process, not only the caller (SECCOMP_FILTER_FLAG_TSYNC).
    flt.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)
    # A syscall made through a foreign ABI (e.g. int 0x80 on x86_64) kills the process
    # instead of slipping past rules written for the native one.
    flt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    deny = pyseccomp.ERRNO(errno.EPERM)
    for name in DENIED_SYSCALLS:
        flt.add_rule(deny, name)
    flt.add_rule(deny, "socket", pyseccomp.Arg(0, pyseccomp.NE, int(socket.AF_UNIX)))
    flt.load()


def _seccomp_mode() -> int:
    # Binary mode: no codec is looked up (imported) lazily after the process is locked down.
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"Seccomp:"):
                return int(line.split()[1])
    return 0


def apply_sandbox() -> SandboxReport:
    """Apply the sandbox to the calling process (irreversibly) and report what was applied.

    Raises `EnclaveError` when a step that must hold (not dumpable, no_new_privs, the
    seccomp filter) could not be applied or read back: the enclave must then not start.
    """
    # Step 0: onnxruntime reads this when it is first imported.
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    telemetry_off = "onnxruntime" not in sys.modules

    libc = _libc()

    # Step 1: network namespace (best effort; see module docstring).
    netns_error = _unshare_network(libc)

    # Step 2: not dumpable, read back.
    _prctl(libc, _PR_SET_DUMPABLE, 0)
    if _prctl(libc, _PR_GET_DUMPABLE, 0) != 0:
        raise EnclaveError("the process is still dumpable")

    # Step 3: no new privileges, read back.
    _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)
    if _prctl(libc, _PR_GET_NO_NEW_PRIVS, 0) != 1:
        raise EnclaveError("no_new_privs is not set")

    # Step 4: seccomp filter, read back from /proc (2 = SECCOMP_MODE_FILTER).
    try:
        _load_seccomp_filter()
    except (OSError, RuntimeError) as exc:  # RuntimeError: pyseccomp found no libseccomp
        raise EnclaveError("the seccomp filter could not be loaded") from exc
    if _seccomp_mode() != 2:
        raise EnclaveError("the seccomp filter is not in force")

    return SandboxReport(
        onnxruntime_telemetry_off=telemetry_off,
        network_namespace=netns_error is None,
        network_namespace_error=netns_error,
        not_dumpable=True,
        no_new_privs=True,
        seccomp_filter=True,
        denied_syscalls=DENIED_SYSCALLS + ("socket(family != AF_UNIX)",),
        allowed_socket_families=("AF_UNIX",),
        running_as_root=os.geteuid() == 0,
    )
