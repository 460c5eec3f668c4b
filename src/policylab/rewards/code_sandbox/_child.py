"""Sandbox child: confines itself, then runs model-written Python (issue 4 part 2).

Run by :mod:`policylab.rewards.code_sandbox.process` as ``python -I -B _child.py JOBFILE``. Standard
library only, and nothing happens at import time: the component registry imports every module of
``policylab.rewards``, this one included.

Order matters. Everything that needs root (namespaces, mounts, privilege drop) happens before the
untrusted code is compiled, and after the drop the process cannot regain root (``no_new_privs``,
empty capability sets, real/effective/saved ids all changed).

Isolation levels (reported to the parent in the first channel record, before any untrusted code):

* ``namespaces`` (running as root where ``unshare`` works): a new network namespace (loopback down:
  no connection to anything, abstract unix sockets included), a new mount namespace whose root is
  recursively read-only with fresh size-capped tmpfs on /tmp, /var/tmp, /dev/shm and /run/lock,
  paths the interpreter needs re-exposed behind directories the sandbox user cannot traverse (/root),
  then a drop to a per-run unprivileged uid chosen by the parent, so that RLIMIT_NPROC binds, the
  parent cannot be signalled and /proc/<ppid>/environ cannot be read.
* ``uid`` (root, but namespaces unavailable or refused with ``isolation="no_namespaces"``, e.g. a
  container without CAP_SYS_ADMIN): the same per-run uid drop and limits, no network namespace;
  instead an audit hook refuses sockets, signals, starting programs and ctypes. Untrusted code never
  runs as root. Common stdlib modules are imported before the drop, because an interpreter installed
  under a directory the uid cannot traverse (/root) cannot load new modules afterwards.
* ``basic`` (not root): limits plus that audit hook. A Python audit hook is not a security boundary
  (native code can bypass it); it makes ordinary attempts fail, and the parent's process-group kill
  still applies. Use it only where the machine itself is disposable.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import json
import os
import resource
import signal
import sys
import traceback

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 2, 4, 32, 4096, 0x4000, 1 << 18
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _AT_RECURSIVE, _AT_FDCWD = 0x1, 0x2, 0x8000, -100
_SYS_MOUNT_SETATTR = 442  # same number on x86_64 and aarch64 (syscalls added after 5.1 share numbers)
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38

# Exit codes the parent understands (anything else is the program's own).
EXIT_SETUP_FAILED = 97

_PROTECTED_TMP_DIRS = ("/var/tmp", "/dev/shm", "/run/lock")
_MAX_DEPTH = 64
_MAX_ITEMS = 1_000_000


class ProbeTimeout(BaseException):
    """Raised by the per-step timer; a BaseException so ``except Exception`` in the solution misses it."""


# --------------------------------------------------------------------------------------------------
# Confinement (root path)
# --------------------------------------------------------------------------------------------------
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _recursive_read_only(libc, path: str) -> None:
    attr = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    ret = libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), path.encode(),
                       ctypes.c_uint(_AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(ret, "mount_setattr(read-only)")


def _needed_paths() -> list[str]:
    """Directories the interpreter reads after the privilege drop (stdlib, site-packages), outermost
    first, with paths inside another listed path left out."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    paths = sorted({os.path.realpath(p) for p in paths} | paths, key=len)
    kept: list[str] = []
    for path in paths:
        if os.path.isdir(path) and not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _blocked_ancestor(path: str) -> str | None:
    """The highest ancestor of ``path`` that others may not traverse (e.g. /root, mode 0700)."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory + "/")


def _bind_from_fd(libc, fd: int, path: str, read_only: bool) -> None:
    """Bind the directory held open by ``fd`` onto ``path``. Mounting from /proc/self/fd/N reaches a
    directory even after something has been mounted over its original location."""
    os.makedirs(path, mode=0o755, exist_ok=True)
    _mount(libc, f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
    if read_only:
        _mount(libc, None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID)


def enter_namespaces(tmpfs_bytes: int) -> str:
    """New mount+network+IPC namespaces, read-only root, fresh tmpfs; returns the work directory.

    The interpreter's own directories stay readable for the sandbox uid even where they sit behind a
    directory it may not traverse (/root, mode 0700) or inside a directory covered by a fresh tmpfs
    (a virtualenv under /tmp): the ancestor is covered by an empty tmpfs, which also hides the rest
    of it, and the needed directory is bound back into place.
    """
    libc = _libc()
    _check(libc.unshare(ctypes.c_int(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC)), "unshare")
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing mounted here reaches the host
    # descriptors are opened inside the new namespace: a bind source must belong to it
    covered = ["/tmp"] + [d for d in _PROTECTED_TMP_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    blocked: dict[str, list[tuple[str, int]]] = {}
    inside_tmp: list[tuple[str, int]] = []
    for path in _needed_paths():
        ancestor = _blocked_ancestor(path)
        if any(_under(path, d) for d in covered):
            inside_tmp.append((path, os.open(path, os.O_PATH | os.O_DIRECTORY)))
        elif ancestor is not None:
            blocked.setdefault(ancestor, []).append((path, os.open(path, os.O_PATH | os.O_DIRECTORY)))
    for ancestor, held in blocked.items():
        _mount(libc, "tmpfs", ancestor, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0755")
        for path, fd in held:
            _bind_from_fd(libc, fd, path, read_only=False)  # made read-only with everything else below
    try:
        _recursive_read_only(libc, "/")
    except OSError as err:  # kernels before 5.12 lack mount_setattr; the uid drop still guards the files
        if err.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
    for directory in covered:
        size = tmpfs_bytes if directory == "/tmp" else 1 << 20
        _mount(libc, "tmpfs", directory, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size},mode=1777")
    for path, fd in inside_tmp:
        _bind_from_fd(libc, fd, path, read_only=True)
    for _, fd in inside_tmp + [h for held in blocked.values() for h in held]:
        os.close(fd)
    os.mkdir("/tmp/work", 0o700)
    return "/tmp/work"


def drop_privileges(uid: int) -> None:
    """Become ``uid`` for good; verify that root cannot be regained."""
    libc = _libc()
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise OSError("privilege drop did not hold")
    # the parent-death signal is cleared by credential changes, so it is set after the drop
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def set_limits(limits: dict) -> None:
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL at hard
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_procs"],) * 2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead


_BLOCKED_EVENTS = ("socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "os.kill", "os.killpg",
                   "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen")
_PRELOAD = ("array", "bisect", "collections", "copy", "dataclasses", "datetime", "decimal", "encodings.idna",
            "fractions", "functools", "heapq", "itertools", "math", "operator", "random", "re", "socket",
            "statistics", "string", "subprocess", "typing", "unicodedata")


def install_audit_hook() -> None:
    """Without a network namespace: refuse sockets, signals, new programs (which would escape this
    hook) and ctypes (which could call the refused functions directly)."""
    blocked = frozenset(_BLOCKED_EVENTS)

    def hook(event, args):
        if event in blocked or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


# --------------------------------------------------------------------------------------------------
# Plain-data encoding of probe values (decoded by harness.decode_value in the parent)
# --------------------------------------------------------------------------------------------------
def encode_value(value, _depth: int = 0, _budget: list | None = None):
    """Tagged JSON of exactly-typed builtin data; anything else (subclasses included) is refused, so
    an object with a forged ``__eq__`` never reaches the comparison, which the parent makes."""
    budget = _budget if _budget is not None else [_MAX_ITEMS]
    budget[0] -= 1
    if _depth > _MAX_DEPTH or budget[0] < 0:
        raise ValueError("value too large or too deeply nested")
    kind = type(value)
    if value is None:
        return ["n"]
    if kind is bool:
        return ["b", value]
    if kind is int:
        return ["i", str(value)]
    if kind is float:
        return ["f", repr(value)]
    if kind is complex:
        return ["c", repr(value.real), repr(value.imag)]
    if kind is str:
        return ["s", value]
    if kind is bytes:
        return ["y", value.hex()]
    sub = lambda v: encode_value(v, _depth + 1, budget)  # noqa: E731
    if kind is list:
        return ["l", [sub(v) for v in value]]
    if kind is tuple:
        return ["t", [sub(v) for v in value]]
    if kind is set:
        return ["S", [sub(v) for v in value]]
    if kind is frozenset:
        return ["F", [sub(v) for v in value]]
    if kind is dict:
        return ["d", [[sub(k), sub(v)] for k, v in value.items()]]
    raise TypeError(f"result of type {kind.__name__} is not plain data")


# --------------------------------------------------------------------------------------------------
# Running the solution
# --------------------------------------------------------------------------------------------------
class Channel:
    """Line-delimited JSON records to the parent over a private pipe."""

    def __init__(self, fd: int):
        self.fd, self._write, self._dumps = fd, os.write, json.dumps

    def send(self, **record) -> None:
        data = (self._dumps(record) + "\n").encode()
        while data:
            data = data[self._write(self.fd, data):]


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:500]


def _timer(seconds: float) -> None:
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.0))


def _on_alarm(signum, frame):
    raise ProbeTimeout()


def run_tests(job: dict, channel: Channel) -> None:
    """Run the solution, then each test's steps: ``exec`` steps run as written, ``probe`` steps are
    expressions whose values go back to the parent, which alone knows the expected values."""
    step_s = job["step_timeout_s"]
    pristine_builtins = dict(builtins.__dict__)  # snapshot before the solution can patch builtins
    signal.signal(signal.SIGALRM, _on_alarm)
    solution_globals = {"__name__": "solution", "__builtins__": builtins}
    try:
        code = compile(job["solution"], "<solution>", "exec")
        _timer(step_s)
        exec(code, solution_globals)
        _timer(0)
    except BaseException as err:  # noqa: BLE001 - any failure of the solution fails every test
        _timer(0)
        channel.send(solution_error=_describe(err))
        return
    channel.send(solution_ok=True)
    for test_index, steps in enumerate(job["tests"]):
        namespace = dict(solution_globals)
        namespace["__builtins__"] = pristine_builtins
        probe_index = 0
        for kind, source in steps:
            try:
                _timer(step_s)
                if kind == "exec":
                    exec(compile(source, f"<test {test_index}>", "exec"), namespace)
                    _timer(0)
                    continue
                value = eval(compile(source, f"<test {test_index}>", "eval"), namespace)
                _timer(0)
                channel.send(test=test_index, probe=probe_index, value=encode_value(value))
            except BaseException as err:  # noqa: BLE001 - the test fails; the next one still runs
                _timer(0)
                channel.send(test=test_index, probe=probe_index if kind == "probe" else None,
                             error="timeout" if isinstance(err, ProbeTimeout) else _describe(err))
                if kind == "exec":
                    break
            probe_index += kind == "probe"
        channel.send(test=test_index, finished=True)
    channel.send(done=True)


def run_program(job: dict) -> int:
    """Run the solution as ``__main__`` reading stdin; returns its exit status."""
    try:
        exec(compile(job["solution"], "<solution>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as stop:
        code = stop.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code & 0xFF
        print(code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        return 1
    finally:
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001
            pass
    return 0


def _processes_of_current_user() -> int:
    uid, count = os.getuid(), 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                count += os.stat(f"/proc/{name}").st_uid == uid
            except OSError:
                pass
    return count


def main(job_path: str) -> int:
    with open(job_path) as handle:
        job = json.load(handle)
    os.unlink(job_path)
    channel = Channel(job["channel_fd"])
    is_root = os.geteuid() == 0
    level = "uid" if is_root else "basic"
    workdir = os.getcwd()
    if is_root and job["isolation"] != "no_namespaces":
        try:
            workdir = enter_namespaces(job["limits"]["tmpfs_bytes"])
            level = "namespaces"
        except OSError as err:
            if job["isolation"] == "strict":
                channel.send(setup_error=_describe(err))
                return EXIT_SETUP_FAILED
    os.chdir(workdir)
    os.environ["HOME"] = os.environ["TMPDIR"] = workdir
    limits = dict(job["limits"])
    try:
        if is_root:
            os.chown(workdir, job["uid"], job["uid"])
        else:  # RLIMIT_NPROC counts all of this user's processes, not only the sandbox's
            limits["max_procs"] += _processes_of_current_user()
        if level == "uid":  # the interpreter may sit where the dropped uid cannot read (/root)
            for module in _PRELOAD:
                try:
                    __import__(module)
                except ImportError:
                    pass
        set_limits(limits)
        if is_root:
            drop_privileges(job["uid"])
        if level != "namespaces":
            install_audit_hook()
    except OSError as err:
        channel.send(setup_error=_describe(err))
        return EXIT_SETUP_FAILED
    channel.send(isolation=level, uid=os.getuid())  # the parent starts the wall clock here
    if job["mode"] == "tests":
        run_tests(job, channel)
        return 0
    return run_program(job)


if __name__ == "__main__":
    status = main(sys.argv[1])
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)
