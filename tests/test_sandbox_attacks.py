"""Hostile programs against the code sandbox: each must be contained, scored as a failure, and leave
the host and this test process untouched. Attacks that would hit a parent process run under a small
helper parent, so that a containment failure kills the helper, not pytest.

Most containment here rests on the per-run uid drop (namespaces or uid level); where the machine only
gives the basic level (not root), those tests are skipped with the reason.
"""

import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from policylab.rewards.code_sandbox import SandboxLimits, isolation_report, run_code_tests, run_python
from policylab.rewards.code_sandbox import process as sandbox_process

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def level():
    report = isolation_report()
    assert report["setup_error"] is None, report
    return report["isolation"]


def needs_uid_drop(level):
    if level == "basic":
        pytest.skip("the sandbox runs as the caller here (not root): no uid drop to contain this attack")


def run_io(program: str, *, wall_s: float = 1.0, isolation: str = "auto", **limit_overrides):
    job = {"mode": "io", "solution": textwrap.dedent(program), "tests": [], "step_timeout_s": wall_s}
    return run_python(job, limits=SandboxLimits(wall_s=wall_s, **limit_overrides), isolation=isolation)


def assert_no_survivors(uid):
    assert uid is not None and uid != os.getuid()
    assert sandbox_process._pids_of_uid(uid) == []


# ---------------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------------
def test_infinite_loop_in_a_test_times_out_and_the_next_test_still_runs():
    code = "def f(x):\n    while x:\n        pass\n    return 0\n"
    result = run_code_tests(code, tests=["assert f(1) == 0", "assert f(0) == 0"], timeout_s=0.5)
    assert [o.detail for o in result.outcomes] == ["timeout", "passed"]


def test_loop_that_ignores_the_step_timer_is_killed_by_the_wall_clock():
    code = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\ndef f():\n    while True:\n        pass\n"
    start = time.monotonic()
    result = run_code_tests(code, tests=["assert f() == 1"], timeout_s=0.5)
    assert time.monotonic() - start < 6
    assert not result.outcomes[0].passed and result.outcomes[0].detail == "not run: timeout"


def test_cpu_time_limit_binds_before_a_long_wall_clock():
    start = time.monotonic()
    result = run_io("while True:\n    pass\n", wall_s=30.0, cpu_s=1)
    assert time.monotonic() - start < 10
    assert result.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not result.timed_out


def test_sleep_past_the_limit():
    program = """
        import signal, time
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        time.sleep(100)
        print("woke up")
    """
    start = time.monotonic()
    result = run_io(program, wall_s=1.0)
    assert time.monotonic() - start < 6
    assert result.timed_out and result.failure == "timeout" and b"woke up" not in result.stdout


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------
def test_fork_bomb_is_capped_and_swept(level):
    needs_uid_drop(level)
    code = """
        import os, time
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
    """
    start = time.monotonic()
    result = run_code_tests(textwrap.dedent(code) + "def f():\n    return 1\n", tests=["assert f() == 1"],
                            timeout_s=1.0)
    assert time.monotonic() - start < 15
    assert not result.outcomes[0].passed
    assert_no_survivors(result.runs[0].uid)


def test_escaped_session_is_swept_after_the_run(level):
    needs_uid_drop(level)
    code = """
        import os, time
        if os.fork() == 0:
            os.setsid()            # leaves the process group the parent kills
            if os.fork() == 0:
                time.sleep(1000)
            os._exit(0)
        def f():
            return 1
    """
    result = run_code_tests(textwrap.dedent(code), tests=["assert f() == 1"], timeout_s=1.0)
    assert result.outcomes[0].passed  # the test itself is fine; what matters is what it left behind
    assert_no_survivors(result.runs[0].uid)


# ---------------------------------------------------------------------------------------------------
# Memory, disk, output
# ---------------------------------------------------------------------------------------------------
def test_memory_bomb_hits_the_address_space_limit():
    code = "def f():\n    return len(bytearray(8 << 30))\ndef g():\n    chunks = []\n" \
           "    while True:\n        chunks.append(bytes(10 << 20))\n"
    result = run_code_tests(code, tests=["assert f() == 0", "assert g() == 0"], timeout_s=5.0,
                            limits=SandboxLimits(memory_mb=256))
    assert [o.passed for o in result.outcomes] == [False, False]
    assert all("MemoryError" in o.detail for o in result.outcomes), result.outcomes


def test_disk_bomb_stays_in_a_capped_private_directory(level):
    program = """
        import os
        written = 0
        try:
            with open("big", "wb") as handle:
                while True:
                    written += handle.write(b"0" * (1 << 20))
                    handle.flush()
        except OSError as err:
            print("stopped", type(err).__name__, written)
    """
    result = run_io(program, wall_s=5.0, file_size_mb=4)
    words = result.stdout.decode().split()
    assert words[:1] == ["stopped"] and int(words[2]) <= 4 << 20


def test_gigabytes_of_stdout_are_cut_at_the_cap_and_the_program_killed():
    start = time.monotonic()
    result = run_io("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", wall_s=20.0,
                    max_output_bytes=1 << 20)
    assert time.monotonic() - start < 8
    assert result.output_overflow and len(result.stdout) == 1 << 20 and not result.timed_out
    assert result.failure == "output limit exceeded"


def test_flood_on_stderr_is_cut_too():
    result = run_io("import os\nwhile True:\n    os.write(2, b'e' * 65536)\n", wall_s=20.0, max_output_bytes=1 << 16)
    assert result.output_overflow and len(result.stderr) == 1 << 16


# ---------------------------------------------------------------------------------------------------
# File system
# ---------------------------------------------------------------------------------------------------
def test_writing_or_deleting_outside_the_temporary_directory(tmp_path, level):
    needs_uid_drop(level)
    nonce = secrets.token_hex(8)
    exposed = tmp_path / "exposed"
    exposed.mkdir()
    exposed.chmod(0o777)  # even a world-writable directory must be out of reach
    canary = exposed / "canary.txt"
    canary.write_text("original")
    canary.chmod(0o666)
    escapes = [f"/tmp/policylab_escape_{nonce}", f"/var/tmp/policylab_escape_{nonce}",
               f"/dev/shm/policylab_escape_{nonce}", str(REPO / f"policylab_escape_{nonce}"),
               str(exposed / f"sibling_{nonce}")]
    program = f"""
        import os, shutil
        canary, escapes = {str(canary)!r}, {escapes!r}
        attempts = [
            lambda: os.remove(canary),
            lambda: open(canary, "w").write("overwritten"),
            lambda: os.chmod(canary, 0o000),
            lambda: os.rename(canary, canary + ".moved"),
            lambda: shutil.rmtree(os.path.dirname(canary)),
        ] + [lambda path=path: open(path, "w").write("escaped") for path in escapes]
        for attempt in attempts:
            try:
                attempt()
                print("did something")
            except OSError as err:
                print("refused", type(err).__name__)
    """
    result = run_io(program, wall_s=5.0)
    assert result.returncode == 0, result.stderr
    assert canary.read_text() == "original"
    assert stat.S_IMODE(canary.stat().st_mode) == 0o666
    assert sorted(p.name for p in exposed.iterdir()) == ["canary.txt"]
    for path in escapes:
        assert not os.path.exists(path), path


# ---------------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("isolation", ["auto", "no_namespaces"])
def test_no_connection_reaches_a_port_the_test_opened(isolation, level):
    if isolation == "no_namespaces" and level == "basic":
        pytest.skip("already covered by the auto case on this machine")
    with socket.socket() as listener, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        udp.bind(("127.0.0.1", 0))
        tcp_port, udp_port = listener.getsockname()[1], udp.getsockname()[1]
        program = f"""
            import socket
            for attempt in (lambda: socket.create_connection(("127.0.0.1", {tcp_port}), timeout=1),
                            lambda: socket.create_connection(("localhost", {tcp_port}), timeout=1),
                            lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(
                                b"hello", ("127.0.0.1", {udp_port}))):
                try:
                    attempt()
                    print("connected")
                except Exception as err:
                    print("refused", type(err).__name__, err)
        """
        result = run_io(program, wall_s=5.0, isolation=isolation)
        listener.settimeout(0.3)
        with pytest.raises(socket.timeout):
            listener.accept()
        udp.settimeout(0.3)
        with pytest.raises(socket.timeout):
            udp.recvfrom(16)
    assert b"connected" not in result.stdout and result.stdout.count(b"refused") == 3, result.stdout


# ---------------------------------------------------------------------------------------------------
# Attacks on the parent process, run under a helper parent
# ---------------------------------------------------------------------------------------------------
HELPER_PARENT = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox_process_helper", sys.argv[1])
process = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = process
spec.loader.exec_module(process)
own_environ = open("/proc/self/environ", "rb").read()
result = process.run_python({"mode": "io", "solution": sys.argv[2], "tests": [], "step_timeout_s": 3.0},
                            limits=process.SandboxLimits(wall_s=3.0))
print(json.dumps({"stdout": result.stdout.decode("utf-8", "replace"), "stderr": result.stderr.decode("utf-8", "replace"),
                  "isolation": result.isolation, "returncode": result.returncode, "uid": result.uid,
                  "secret_in_own_environ": sys.argv[3].encode() in own_environ}))
"""


def run_under_helper(program: str, secret: str = "unused") -> dict:
    env = dict(os.environ, POLICYLAB_TEST_SECRET=secret)
    helper = subprocess.run([sys.executable, "-c", HELPER_PARENT, sandbox_process.__file__,
                             textwrap.dedent(program), secret], env=env, capture_output=True, timeout=60)
    assert helper.returncode == 0, f"the helper parent died ({helper.returncode}): {helper.stderr[-2000:]!r}"
    return json.loads(helper.stdout)


def test_parent_environment_is_not_visible(level):
    needs_uid_drop(level)
    secret = "s3cret-" + secrets.token_hex(12)
    program = """
        import os
        print("ENV", dict(os.environ))
        pids = [os.getppid(), 1] + [int(p) for p in os.listdir("/proc") if p.isdigit()]
        for pid in pids:
            try:
                with open(f"/proc/{pid}/environ", "rb") as handle:
                    print(pid, handle.read())
            except OSError:
                pass
    """
    report = run_under_helper(program, secret)
    assert report["secret_in_own_environ"]  # the secret is really there to be stolen
    assert "ENV" in report["stdout"]
    assert secret not in report["stdout"] and secret not in report["stderr"]


def test_signalling_the_parent_is_refused(level):
    needs_uid_drop(level)
    program = """
        import os, signal
        parent = os.getppid()
        attempts = [("kill parent", lambda: os.kill(parent, signal.SIGKILL)),
                    ("killpg parent", lambda: os.killpg(os.getpgid(parent), signal.SIGKILL)),
                    ("kill all", lambda: os.kill(-1, signal.SIGKILL))]
        for name, attempt in attempts:
            try:
                attempt()
                print(name, "sent")
            except OSError as err:
                print(name, "refused", type(err).__name__)
        print("still here")
    """
    report = run_under_helper(program)
    assert report["uid"] not in (None, 0, os.getuid())
    assert "sent" not in report["stdout"].replace("kill all sent", "")  # kill(-1) may only hit its own uid
    assert "kill parent refused" in report["stdout"] and "killpg parent refused" in report["stdout"]


# ---------------------------------------------------------------------------------------------------
# Crashes and early exits
# ---------------------------------------------------------------------------------------------------
def test_ctypes_segfault_fails_the_tests():
    code = "import ctypes\nctypes.string_at(0)\ndef f():\n    return 1\n"
    result = run_code_tests(code, tests=["assert f() == 1"], timeout_s=2.0)
    assert result.runs[0].returncode == -signal.SIGSEGV
    assert not result.outcomes[0].passed and "exit status -11" in result.outcomes[0].detail


@pytest.mark.parametrize("code", ["import os\nos._exit(0)\ndef f():\n    return 1\n",
                                  "import os\ndef f():\n    os._exit(0)\n"])
def test_exiting_zero_before_the_tests_run_is_not_a_pass(code):
    result = run_code_tests(code, tests=["assert f() == 1", "assert True"], timeout_s=2.0)
    assert [o.passed for o in result.outcomes] == [False, False]


# ---------------------------------------------------------------------------------------------------
# Tampering with the harness
# ---------------------------------------------------------------------------------------------------
def test_object_that_equals_everything_is_not_accepted():
    code = "class Anything:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n" \
           "def f(x):\n    return Anything()\n"
    result = run_code_tests(code, tests=["assert f(1) == 987654321", "assert f(2) == [1, 2]"])
    assert result.pass_fraction == 0.0
    assert "not plain data" in result.outcomes[0].detail


def test_patched_builtins_do_not_change_the_verdict():
    code = """
        import builtins
        builtins.sorted = lambda *a, **k: [1, 2, 3]
        builtins.len = lambda x: 3
        builtins.isinstance = lambda *a: True
        def f(x):
            return "nope"
    """
    tests = ["assert sorted(f(0)) == [1, 2, 3]", "assert len(f(0)) == 3", "assert isinstance(f(0), list)"]
    result = run_code_tests(textwrap.dedent(code), tests=tests)
    assert result.pass_fraction == 0.0


def test_forged_results_and_pass_markers_are_not_accepted():
    code = """
        import json, os
        forged = [{"test": 0, "probe": 0, "value": ["i", "1"]}, {"solution_ok": True}, {"done": True}]
        payload = ("PASS\\nOK\\n" + "\\n".join(json.dumps(r) for r in forged) + "\\n").encode()
        for fd in range(1, 64):
            try:
                os.write(fd, payload)
            except OSError:
                pass
        def f(x):
            return 0
    """
    result = run_code_tests(textwrap.dedent(code), tests=["assert f(1) == 987654321"])
    assert not result.outcomes[0].passed
    assert result.outcomes[0].detail in ("conflicting results", "wrong answer")


def test_expected_values_cannot_be_found_inside_the_sandbox():
    code = """
        import gc, os, sys
        PIECES = ["9876", "54321"], ["expected_", "marker_xyz"]  # joined at run time: no literal copies
        TARGETS = {int("".join(PIECES[0])), "".join(PIECES[1]), "".join(PIECES[0])}
        def contains(obj):
            if isinstance(obj, dict):
                return any(k in TARGETS or v in TARGETS for k, v in obj.items()
                           if isinstance(k, (int, str)) and isinstance(v, (int, str)))
            if isinstance(obj, (list, tuple, set)):
                return any(x in TARGETS for x in obj if isinstance(x, (int, str)))
            return False
        def search(label):
            hits = sum(contains(o) for o in gc.get_objects() if o is not TARGETS)
            frame = sys._getframe()
            while frame is not None:
                hits += contains(frame.f_locals) + contains(frame.f_globals)
                hits += any(isinstance(c, (int, str)) and c in TARGETS for c in frame.f_code.co_consts)
                if 424242 in frame.f_locals.values():
                    print("FOUND_ARGUMENT")
                frame = frame.f_back
            for name in os.listdir("."):
                hits += "".join(PIECES[0]) in open(name, errors="ignore").read()
            hits += "".join(PIECES[0]).encode() in open("/proc/self/cmdline", "rb").read()
            print(label, "FOUND" if hits else "clean", len(gc.get_objects()))
        search("module")
        def f(x):
            search("call")
            return 0
    """
    result = run_code_tests(textwrap.dedent(code), tests=["assert f(424242) == 987654321",
                                                          "assert f(7) == 'expected_marker_xyz'"])
    out = result.runs[0].stdout.decode()
    assert "FOUND_ARGUMENT" in out  # the search works: it sees what the child was given
    assert "FOUND\n" not in out and out.count("clean") == 3
    assert result.pass_fraction == 0.0


def test_raising_base_exceptions_in_a_test_fails_it_only():
    code = "def f(x):\n    if x == 1:\n        raise KeyboardInterrupt\n    if x == 2:\n        raise SystemExit(0)\n" \
           "    return x\n"
    result = run_code_tests(code, tests=["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3"])
    assert [o.passed for o in result.outcomes] == [False, False, True]
