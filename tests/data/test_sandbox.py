"""The code sandbox against adversarial programs: each is contained, gets a typed status,
returns within its deadline + 1 s and leaves no process behind."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from posttrain.data import sandbox
from posttrain.data.sandbox import SandboxLimits, run_program, run_tests

LIMITS = SandboxLimits(cpu_time_s=1, wall_time_s=2.0, memory_mb=256, max_output_bytes=64 * 1024)
UID_LO, UID_HI = 60000, 60000 + 4096


def _available_backends() -> list[str]:
    out = ["rlimits"]
    if sandbox._probe_unshare("/bin/true"):
        out.append("unshare")
    if sandbox.detect_backend() == "bwrap":
        out.append("bwrap")
    return out


BACKENDS = _available_backends()
ISOLATED = [b for b in BACKENDS if b != "rlimits"]


def _sandbox_processes() -> list[int]:
    """Live (non-zombie) processes owned by a sandbox uid."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if UID_LO <= st.st_uid < UID_HI and state != "Z":
            pids.append(int(entry))
    return pids


def _run(code: str, backend: str, stdin: str = "", limits: SandboxLimits = LIMITS):
    t0 = time.monotonic()
    res = run_program(code, stdin, limits=limits, backend=backend)
    elapsed = time.monotonic() - t0
    assert elapsed <= limits.wall_time_s + 1.0, f"took {elapsed:.2f}s"
    if os.geteuid() == 0:
        assert _sandbox_processes() == [], "a sandboxed process survived the run"
    return res


@pytest.mark.parametrize("backend", BACKENDS)
def test_ok_program_echoes_stdin(backend):
    res = _run("print(input()[::-1])", backend, "abc\n")
    assert (res.status, res.stdout) == ("ok", "cba\n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_loop_times_out(backend):
    assert _run("while True: pass", backend).status == "timeout"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sleeping_program_hits_wall_clock(backend):
    # No CPU used, so only the parent's wall-clock deadline can stop it.
    assert _run("import time\ntime.sleep(60)", backend).status == "timeout"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fork_bomb_contained(backend):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    res = _run(code, backend)
    assert res.status in ("timeout", "runtime_error")


@pytest.mark.parametrize("backend", BACKENDS)
def test_setsid_escapee_is_killed(backend):
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
        "print('parent done')\n"
    )
    res = _run(code, backend)  # _run asserts no survivor
    assert res.status == "ok"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ten_gigabytes_allocation(backend):
    res = _run("x = bytearray(10 * 1024**3)\nprint(len(x))", backend)
    assert res.status == "memory"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gigabyte_of_output_is_capped(backend):
    code = "import sys\nfor _ in range(16384):\n    sys.stdout.write('x' * 65536)\n"
    res = _run(code, backend)
    assert res.status == "output_limit"
    assert len(res.stdout) <= LIMITS.max_output_bytes


@pytest.mark.parametrize("backend", BACKENDS)
def test_writing_outside_workdir(backend, tmp_path):
    target = tmp_path / "pwned.txt"
    os.chmod(tmp_path, 0o755)
    code = f"open({str(target)!r}, 'w').write('x')\n"
    res = _run(code, backend)
    if os.geteuid() == 0 or backend != "rlimits":
        # Another uid (as root) or a private /tmp (namespaces): either way, no write lands.
        assert res.status == "runtime_error"
        assert not target.exists()


@pytest.mark.parametrize("backend", ISOLATED)
def test_tmp_is_private(backend):
    name = f"/tmp/posttrain-sandbox-test-{os.getpid()}"
    res = _run(f"open({name!r}, 'w').write('x')\nprint('wrote')", backend)
    assert res.status == "ok"
    assert not os.path.exists(name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cannot_read_parent_environment(backend, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_SECRET_TOKEN", "hunter2")
    code = (
        "import os\nprint(sorted(os.environ))\n"
        "try:\n    print(open(f'/proc/{os.getppid()}/environ').read())\nexcept Exception as e:\n    print(type(e).__name__)\n"
    )
    res = _run(code, backend)
    assert "hunter2" not in res.stdout and "POSTTRAIN_SECRET_TOKEN" not in res.stdout


@pytest.mark.parametrize("backend", ISOLATED)
def test_no_network(backend):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')\n"
        res = _run(code, backend)
        assert res.status == "runtime_error" and "connected" not in res.stdout
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cannot_signal_parent(backend):
    me = os.getpid()
    code = (
        "import os, signal\n"
        f"for pid in (os.getppid(), {me}):\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n    except Exception as e:\n        print(type(e).__name__)\n"
    )
    res = _run(code, backend)
    assert res.status in ("ok", "runtime_error")
    os.kill(me, 0)  # still alive


@pytest.mark.parametrize("backend", BACKENDS)
def test_sandbox_failure_is_sandbox_error(backend):
    res = run_program("print(1)", python="/nonexistent/python3", limits=LIMITS, backend=backend)
    assert res.status == "sandbox_error"


@pytest.mark.parametrize("backend", BACKENDS)
def test_exit_code_cannot_fake_sandbox_error(backend):
    assert _run("import sys\nsys.exit(127)", backend).status == "runtime_error"


# ------------------------------------------------------------------ the judge

ADD_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"}]
CORRECT = "a, b = map(int, input().split())\nprint(a + b)\n"


@pytest.fixture(scope="module")
def backend():
    return sandbox.detect_backend()


def test_correct_program_passes(backend):
    rep = run_tests(CORRECT, ADD_TESTS, limits=LIMITS, backend=backend)
    assert (rep.status, rep.passed, rep.total, rep.score) == ("passed", 2, 2, 1.0)


@pytest.mark.parametrize(
    "code",
    [
        "import sys\nsys.exit(0)\n" + CORRECT,  # exits before doing the work
        "print('PASSED')\n",  # prints a victory banner
        "import builtins\nbuiltins.print = lambda *a, **k: None\nprint(3)\n",  # monkey-patches builtins
        "class A:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\nprint(A())\n",
        "a, b = map(int, input().split())\nprint(str(a + b)[:-1])\n",  # a prefix of the answer
        "print(3)\n",  # hard-codes the first answer
    ],
    ids=["exit_early", "prints_passed", "monkeypatch", "always_equal", "prefix", "hardcoded"],
)
def test_cheats_are_wrong_answers(code, backend):
    rep = run_tests(code, ADD_TESTS, limits=LIMITS, backend=backend, stop_on_failure=False)
    assert rep.status == "wrong_answer"
    assert rep.score < 1.0


def test_prefix_of_expected_output_is_wrong():
    assert sandbox.normalize_output("1\n2\n") != sandbox.normalize_output("1\n2\n3\n")
    assert sandbox.normalize_output("1  \n2\n\n") == sandbox.normalize_output("1\n2")


def test_partial_credit_and_stop_on_failure(backend):
    code = "a, b = map(int, input().split())\nprint(3)\n"
    rep = run_tests(code, ADD_TESTS, limits=LIMITS, backend=backend, stop_on_failure=False)
    assert (rep.status, rep.passed, rep.total) == ("wrong_answer", 1, 2)
    rep = run_tests("print(0)", ADD_TESTS, limits=LIMITS, backend=backend, stop_on_failure=True)
    assert (rep.passed, len(rep.results)) == (0, 1)


def test_judge_reports_sandbox_error_not_wrong_answer(backend):
    rep = run_tests(CORRECT, ADD_TESTS, limits=LIMITS, backend=backend, python="/nonexistent/python3")
    assert rep.status == "sandbox_error"


def test_bad_backend_name():
    with pytest.raises(ValueError, match="not one of"):
        run_program("print(1)", backend="docker")


def test_signals_are_typed():
    # A CPU-limit kill (SIGXCPU) is a timeout; a kernel SIGKILL with a MemoryError trace is memory.
    assert sandbox._classify(-signal.SIGXCPU, "", LIMITS, 1.0) == "timeout"
    assert sandbox._classify(128 + signal.SIGXCPU, "", LIMITS, 1.0) == "timeout"
    assert sandbox._classify(1, "Traceback...\nMemoryError\n", LIMITS, 0.1) == "memory"
    assert sandbox._classify(1, "ZeroDivisionError", LIMITS, 0.1) == "runtime_error"
    assert (
        sandbox._classify(-signal.SIGKILL, "", LIMITS, LIMITS.cpu_time_s + 0.5) == "timeout"
    )  # hard CPU cap
    assert sandbox._classify(128 + signal.SIGKILL, "", LIMITS, 0.1) == "memory"  # OOM killer


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignoring_sigxcpu_still_times_out(backend):
    code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass\n"
    assert _run(code, backend).status == "timeout"


def test_preexec_fallback_applies_the_same_limits(monkeypatch):
    monkeypatch.setattr(sandbox, "_prlimit_prefix", lambda limits: None)
    assert _run("x = bytearray(10 * 1024**3)", "rlimits").status == "memory"
    assert _run("while True: pass", "rlimits").status == "timeout"
