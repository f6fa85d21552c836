"""Process sandbox the enclave program applies to itself (the ``sim`` backend's walls).

Why: under ``sim`` there is no hardware isolation, so the enclave process walls itself in:
once compromised (a hostile image exploiting the decoder, say) it can still talk to its
host over the inherited channel, and nothing else. It creates no socket, starts no
program, reads only the files it runs from, writes no file, and cannot reach other
processes; other unprivileged processes cannot read its memory. Every wall is default-deny.

Two calls, both in the enclave's ``__main__`` on the ``sim`` backend (not under Gramine,
where the SGX enclave is the wall and these system calls do not exist):

- `prepare_environment` first thing, before numpy or onnxruntime are imported;
- `apply_sandbox` once the program's imports are done and the ``sim`` secrets are loaded
  from the state directory, and before the channel is read. Until then the process has
  read only the installation and the state files; from then on it handles input. The
  secrets are read before the walls because they belong to the installing user and the
  process no longer is that user afterwards; so the state directory needs no access at all.

Steps (each read back where the kernel lets us; a step that fails refuses the start):

0. (`prepare_environment`) ``ORT_DISABLE_TELEMETRY=1`` (the onnxruntime 1.32 wheel ships
   Microsoft 1DS telemetry and otherwise keeps an event store under ``$XDG_CACHE_HOME``)
   and ``OPENBLAS_NUM_THREADS=1`` (numpy's OpenBLAS would otherwise start one thread per
   core at import): imports then start no thread, which step 1 needs.
1. One thread only. Landlock, capabilities and ``unshare`` act on the calling thread; a
   thread that already exists would keep the host's rights. Refused otherwise.
2. Namespaces. As root: ``unshare(CLONE_NEWNET)``, a network namespace with only a down
   loopback. Otherwise: ``unshare(CLONE_NEWUSER | CLONE_NEWNET)``, mapping only the
   caller's own uid and gid, with ``setgroups`` denied.
3. An empty working directory: a fresh directory under the temp dir, entered and then
   removed. Nothing exists in it and nothing can be created in a removed directory.
4. Identity. As root: supplementary groups dropped, real/effective/saved gid and uid
   `SANDBOX_UID` (65534, ``nobody``), so the process owns nothing, and can neither signal
   nor trace root's processes. Its *file-system* uid stays the starting uid (0): the files
   it must read (the interpreter here lives under ``/root``, mode 0700; bundle files)
   belong to that user and need not be made world-readable; step 7 limits what that uid
   can open to reading four trees. Then every capability is dropped: bounding set,
   ambient, inheritable, permitted, effective (a process with CAP_SYS_PTRACE could read
   even a non-dumpable host). Not root: the capabilities the user namespace gave are
   dropped the same way.
5. ``prctl(PR_SET_DUMPABLE, 0)``: no core dumps, no ptrace attach or ``/proc/<pid>/mem``
   by other processes of the same user.
6. ``prctl(PR_SET_NO_NEW_PRIVS, 1)``: required by steps 7 and 8.
7. Landlock (ABI >= `MIN_LANDLOCK_ABI`; three system calls, through ctypes: the PyPI
   bindings checked lack the ABI 4-6 rights and scopes): every file-system right the kernel
   knows is handled, and only *reading* files and listing directories is granted, beneath
   `SYSTEM_READ_ONLY`, the interpreter (``sys.base_prefix``), the virtual environment
   (``sys.prefix``), the ``infenclave`` package and each bundle under ``--bundles`` (a
   directory holding ``manifest.json``; not ``--bundles`` itself, where the owner's
   ``BUNDLE.key`` may lie, nor the state directory). With ABI >= 4 TCP bind/connect are
   refused; with ABI >= 6 abstract AF_UNIX sockets and signals to processes outside the
   sandbox are too.
8. A seccomp allow-list (`ALLOWED_SYSCALLS`, measured with ``strace -f`` on workers
   serving the test suite), synchronised to every thread, default EPERM: no socket
   creation of any family and no ``connect``/``bind``/``listen``/``accept`` (the channel is
   inherited; with ``--listen`` the listening socket is created before the walls and
   ``accept4``/``accept`` are allowed on that one descriptor only); no ``execve``, ``ptrace``,
   ``process_vm_*``, ``mount``, ``unshare``, ``setns``, io_uring, ``memfd_create``; ``clone3``
   answers ENOSYS (glibc then uses ``clone``) and ``clone`` is allowed for threads only (`CLONE_THREAD_FLAGS` set, no
   ``CLONE_NEW*``); ``prctl``, ``ioctl`` and ``prlimit64`` only with the arguments listed;
   a foreign-ABI system call kills the process.

Not protected against, and said so: root on the host (it reads any memory and every file,
and can ``setns`` from outside), the kernel and hardware, side channels, and file
descriptors to network sockets inherited from the parent (the host must not pass any:
``subprocess`` closes them by default).
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from infenclave.errors import EnclaveError

__all__ = [
    "ALLOWED_SYSCALLS",
    "MIN_LANDLOCK_ABI",
    "SANDBOX_UID",
    "SYSTEM_READ_ONLY",
    "SandboxReport",
    "apply_sandbox",
    "prepare_environment",
]

#: The uid and gid a root-started enclave switches to (``nobody``/``nogroup``).
SANDBOX_UID = 65534
#: Landlock ABI 1 (Linux 5.13) already refuses every write; later ABIs add walls (above).
MIN_LANDLOCK_ABI = 1
#: System files the worker reads after the walls: shared libraries that glibc, numpy,
#: Pillow and onnxruntime load lazily, and what onnxruntime reads to size its thread pools.
SYSTEM_READ_ONLY: tuple[str, ...] = (
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/etc/ld.so.cache",
    "/dev/null",
    "/proc/cpuinfo",
    "/sys/devices/system/cpu",
)
#: Environment set by `prepare_environment`.
ENVIRONMENT = {"ORT_DISABLE_TELEMETRY": "1", "OPENBLAS_NUM_THREADS": "1"}

#: Syscalls allowed without conditions (x86_64 and aarch64 names; absent ones are skipped).
ALLOWED_SYSCALLS: tuple[str, ...] = (
    # files and descriptors already open, or opened read-only under Landlock
    "read",
    "readv",
    "pread64",
    "write",
    "writev",
    "pwrite64",
    "lseek",
    "close",
    "close_range",
    "openat",
    "open",
    "fstat",
    "newfstatat",
    "stat",
    "lstat",
    "statx",
    "readlink",
    "readlinkat",
    "getdents64",
    "access",
    "faccessat",
    "faccessat2",
    "getcwd",
    "fcntl",
    "dup",
    "dup2",
    "dup3",
    "poll",
    "ppoll",
    "select",
    "pselect6",
    # memory
    "mmap",
    "munmap",
    "mprotect",
    "mremap",
    "madvise",
    "brk",
    "mbind",
    "get_mempolicy",
    "set_mempolicy",
    # threads, time, signals, identity
    "futex",
    "set_robust_list",
    "get_robust_list",
    "rseq",
    "set_tid_address",
    "sched_yield",
    "sched_getaffinity",
    "sched_setaffinity",
    "exit",
    "exit_group",
    "getpid",
    "gettid",
    "getppid",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getresuid",
    "getresgid",
    "getrandom",
    "clock_gettime",
    "clock_getres",
    "clock_nanosleep",
    "nanosleep",
    "gettimeofday",
    "getrusage",
    "times",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "restart_syscall",
    "uname",
    "sysinfo",
)
#: ``prctl`` options allowed: thread names only (not PR_SET_DUMPABLE, not PR_SET_SECCOMP).
ALLOWED_PRCTL = (15, 16)  # PR_SET_NAME, PR_GET_NAME
#: ``ioctl`` requests allowed: TCGETS (``isatty``), FIONREAD, FIOCLEX, FIONBIO.
ALLOWED_IOCTL = (0x5401, 0x541B, 0x5451, 0x5421)
#: ``clone`` flags a new thread carries (glibc's pthread_create) ...
CLONE_THREAD_FLAGS = 0x00010000 | 0x00000100 | 0x00000800  # CLONE_THREAD | CLONE_VM | CLONE_SIGHAND
#: ... and flags a thread clone must not carry: every CLONE_NEW*, CLONE_VFORK, CLONE_PARENT.
_CLONE_FORBIDDEN = (
    0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x00004000 | 0x00008000
)

# <linux/prctl.h>, <linux/capability.h>, <linux/sched.h>, <linux/landlock.h>
_PR_GET_DUMPABLE, _PR_SET_DUMPABLE = 3, 4
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS, _PR_GET_NO_NEW_PRIVS = 38, 39
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS = {
    "x86_64": {"capget": 125, "capset": 126, "setfsuid": 122},
    "aarch64": {"capget": 90, "capset": 91, "setfsuid": 151},
}
_SYS_LANDLOCK = (444, 445, 446)  # create_ruleset, add_rule, restrict_self (all architectures)
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_LL_READ_FILE, _LL_READ_DIR = 1 << 2, 1 << 3
#: Highest file-system right bit + 1 by ABI: v1 13 rights, v2 +REFER, v3 +TRUNCATE, v5 +IOCTL_DEV.
_LL_FS_BITS = {1: 13, 2: 14, 3: 15, 4: 15, 5: 16}
_LL_NET_TCP = 0b11  # BIND_TCP | CONNECT_TCP (ABI 4)
_LL_SCOPES = 0b11  # ABSTRACT_UNIX_SOCKET | SIGNAL (ABI 6)


@dataclass(frozen=True)
class SandboxReport:
    """What `apply_sandbox` applied, for the enclave's HELLO, its log and the tests."""

    onnxruntime_telemetry_off: bool
    started_as_root: bool
    uid: int
    network_namespace: bool
    user_namespace: bool
    capabilities_dropped: bool
    not_dumpable: bool
    no_new_privs: bool
    landlock_abi: int
    read_only_paths: tuple[str, ...]
    seccomp_filter: bool
    allowed_syscalls: tuple[str, ...]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)  # dlopen(NULL): starts no helper program


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise EnclaveError(f"sandbox: {what} failed: {errno.errorcode.get(err, err)}")
    return result


def _syscall(number: int, *args: object) -> int:
    return int(_libc.syscall(ctypes.c_long(number), *args))


def _prctl(option: int, arg: int = 0) -> int:
    zero = ctypes.c_ulong(0)
    return _check(int(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), zero, zero, zero)), f"prctl({option})")


def _status(fd: int, field: str) -> list[str]:
    """A field of ``/proc/self/status``, read through *fd* (opened before Landlock denies /proc)."""
    for line in os.pread(fd, 1 << 16, 0).splitlines():
        if line.startswith(field.encode() + b":"):
            return line.decode("ascii").split()[1:]
    return []


def prepare_environment() -> None:
    """Step 0: environment that makes the imports start no thread and phone nowhere."""
    os.environ.update(ENVIRONMENT)


def _namespaces(root: bool) -> None:
    """Step 2."""
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNET if root else _CLONE_NEWUSER | _CLONE_NEWNET
    _check(int(_libc.unshare(ctypes.c_int(flags))), "unshare")
    if not root:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w", encoding="ascii") as handle:
                handle.write(text)


def _empty_cwd() -> None:
    """Step 3."""
    path = tempfile.mkdtemp(prefix="infenclave-cwd-")
    os.chdir(path)
    os.rmdir(path)


def _drop_identity(root: bool, machine: str, status: int) -> None:
    """Step 4."""
    numbers = _SYS[machine]
    for cap in range(int(Path("/proc/sys/kernel/cap_last_cap").read_text()) + 1):
        _prctl(_PR_CAPBSET_DROP, cap)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    if root:
        fs_uid = os.geteuid()
        os.setgroups([])
        os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        _prctl(8, 1)  # PR_SET_KEEPCAPS: keep CAP_SETUID across the switch, for setfsuid
        os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        _prctl(8, 0)
        header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
        _check(_syscall(numbers["capget"], ctypes.byref(header), data), "capget")
        data[0].effective = 1 << 7  # CAP_SETUID, from the kept permitted set
        _check(_syscall(numbers["capset"], ctypes.byref(header), data), "capset")
        _syscall(numbers["setfsuid"], ctypes.c_uint(fs_uid))  # returns the old value
    header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    _check(_syscall(numbers["capset"], ctypes.byref(header), data), "capset")
    caps = {name: int(_status(status, name)[0], 16) for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    if any(caps.values()):
        raise EnclaveError(f"sandbox: capabilities remain: {caps}")
    if root and [int(v) for v in _status(status, "Uid")] != [SANDBOX_UID] * 3 + [fs_uid]:
        raise EnclaveError("sandbox: the uid switch did not hold")


def _read_only_paths(bundles_dir: Path) -> list[str]:
    import infenclave

    trees = [sys.base_prefix, sys.prefix, str(Path(infenclave.__file__).resolve().parent)]
    for entry in sorted(Path(bundles_dir).iterdir()):
        if entry.is_dir() and not entry.is_symlink() and (entry / "manifest.json").is_file():
            trees.append(str(entry.resolve()))
    return [p for p in (*SYSTEM_READ_ONLY, *trees) if os.path.exists(p)]


def _landlock(paths: list[str]) -> int:
    """Step 7; returns the ABI in force."""
    create, add_rule, restrict = _SYS_LANDLOCK
    abi = _syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    if abi < MIN_LANDLOCK_ABI:
        raise EnclaveError(f"sandbox: Landlock ABI {abi} < {MIN_LANDLOCK_ABI} (kernel without Landlock?)")
    attr = _RulesetAttr(
        (1 << _LL_FS_BITS[min(abi, 5)]) - 1, _LL_NET_TCP if abi >= 4 else 0, _LL_SCOPES if abi >= 6 else 0
    )
    ruleset = _check(
        _syscall(create, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    try:
        for path in paths:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                access = _LL_READ_FILE | (_LL_READ_DIR if os.path.isdir(path) else 0)
                rule = _PathBeneath(access, fd)
                _check(
                    _syscall(
                        add_rule,
                        ctypes.c_int(ruleset),
                        ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
                        ctypes.byref(rule),
                        ctypes.c_uint32(0),
                    ),
                    f"landlock_add_rule({path})",
                )
            finally:
                os.close(fd)
        _check(_syscall(restrict, ctypes.c_int(ruleset), ctypes.c_uint32(0)), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


def _seccomp(seccomp: object, listen_fd: int | None = None) -> tuple[str, ...]:
    """Step 8; returns the syscalls allowed without conditions."""
    sc = seccomp
    flt = sc.SyscallFilter(sc.ERRNO(errno.EPERM))  # type: ignore[attr-defined]
    flt.set_attr(sc.Attr.CTL_TSYNC, 1)  # type: ignore[attr-defined]
    flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)  # type: ignore[attr-defined]
    allowed = []
    for name in ALLOWED_SYSCALLS:
        try:
            flt.add_rule(sc.ALLOW, name)  # type: ignore[attr-defined]
        except (OSError, ValueError, RuntimeError):
            continue  # no such syscall on this architecture (e.g. open, stat on aarch64)
        allowed.append(name)
    allow, arg = sc.ALLOW, sc.Arg  # type: ignore[attr-defined]
    for option in ALLOWED_PRCTL:
        flt.add_rule(allow, "prctl", arg(0, sc.EQ, option))  # type: ignore[attr-defined]
    for request in ALLOWED_IOCTL:
        flt.add_rule(allow, "ioctl", arg(1, sc.EQ, request))  # type: ignore[attr-defined]
    flt.add_rule(allow, "prlimit64", arg(2, sc.EQ, 0))  # type: ignore[attr-defined]  # read only
    flt.add_rule(allow, "tgkill", arg(0, sc.EQ, os.getpid()))  # type: ignore[attr-defined]  # own threads
    flt.add_rule(
        allow,
        "clone",
        arg(
            0,
            sc.MASKED_EQ,  # type: ignore[attr-defined]
            CLONE_THREAD_FLAGS | _CLONE_FORBIDDEN,
            CLONE_THREAD_FLAGS,
        ),
    )
    flt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # type: ignore[attr-defined]
    for name in ("accept4", "accept") if listen_fd is not None else ():
        try:  # the host's connections, on the listening socket made before the walls only
            flt.add_rule(allow, name, arg(0, sc.EQ, listen_fd))  # type: ignore[attr-defined]
        except (OSError, ValueError, RuntimeError):
            continue  # accept: absent on aarch64
        allowed.append(f"{name}(fd {listen_fd})")
    flt.load()
    return tuple(allowed)


def apply_sandbox(bundles_dir: Path, listen_fd: int | None = None) -> SandboxReport:
    """Apply steps 1-8 to the calling process (irreversibly) and report what holds.

    *bundles_dir* is the enclave's ``--bundles``; *listen_fd* the listening socket of
    ``--listen``, on which alone ``accept`` stays allowed. Raises `EnclaveError` (the enclave must
    then not start) when any step cannot be applied or read back.
    """
    telemetry_off = "onnxruntime" not in sys.modules or os.environ.get("ORT_DISABLE_TELEMETRY") == "1"
    machine = os.uname().machine
    if machine not in _SYS:
        raise EnclaveError(f"sandbox: unsupported architecture {machine}")
    # pyseccomp runs ldconfig (a program) when imported: before step 8 refuses execve.
    import pyseccomp  # type: ignore[import-untyped]  # (no stubs, no py.typed)

    status = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _apply(bundles_dir, pyseccomp, machine, status, telemetry_off, listen_fd)
    finally:
        os.close(status)


def _apply(
    bundles_dir: Path, pyseccomp: object, machine: str, status: int, telemetry_off: bool, listen_fd: int | None = None
) -> SandboxReport:
    # Step 1.
    if len(os.listdir("/proc/self/task")) != 1:
        raise EnclaveError("sandbox: the process already runs several threads")
    root = os.geteuid() == 0
    netns_before = os.readlink("/proc/self/ns/net")
    _namespaces(root)  # step 2
    if os.readlink("/proc/self/ns/net") == netns_before:
        raise EnclaveError("sandbox: the network namespace did not change")
    paths = _read_only_paths(bundles_dir)  # (before step 3: --bundles may be relative)
    _empty_cwd()  # step 3
    _drop_identity(root, machine, status)  # step 4
    _prctl(_PR_SET_DUMPABLE, 0)  # step 5
    if _prctl(_PR_GET_DUMPABLE) != 0:
        raise EnclaveError("sandbox: the process is still dumpable")
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)  # step 6
    if _prctl(_PR_GET_NO_NEW_PRIVS) != 1:
        raise EnclaveError("sandbox: no_new_privs is not set")
    abi = _landlock(paths)  # step 7
    try:
        allowed = _seccomp(pyseccomp, listen_fd)  # step 8
    except (OSError, RuntimeError, ValueError) as exc:
        raise EnclaveError("sandbox: the seccomp filter could not be loaded") from exc
    if _status(status, "Seccomp") != ["2"]:
        raise EnclaveError("sandbox: the seccomp filter is not in force")
    return SandboxReport(
        onnxruntime_telemetry_off=telemetry_off,
        started_as_root=root,
        uid=os.getuid(),
        network_namespace=True,
        user_namespace=not root,
        capabilities_dropped=True,
        not_dumpable=True,
        no_new_privs=True,
        landlock_abi=abi,
        read_only_paths=tuple(paths),
        seccomp_filter=True,
        allowed_syscalls=allowed,
    )
