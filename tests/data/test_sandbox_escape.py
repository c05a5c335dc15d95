"""The sandbox's filesystem and socket walls (issue #22), under bubblewrap and under unshare,
run as root and as a normal user: a capped total of writes that never reach the host's disk,
no Unix-domain socket on a host path, no host home, no writable host location."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from posttrain.data import sandbox
from posttrain.data.sandbox import SandboxLimits, run_program

SRC = str(Path(sandbox.__file__).resolve().parents[2])
NOBODY = 65534
LIMITS = SandboxLimits(cpu_time_s=4, wall_time_s=8.0, memory_mb=256, disk_mb=8)
BACKENDS = [b for b in ("bwrap", "unshare") if b in __import__("test_sandbox").BACKENDS]
USERS = ["root", "user"] if os.geteuid() == 0 else ["user"]


def _user_can_namespace() -> bool:
    if os.geteuid() != 0:
        return True
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "unshare", "--user", "true"]
    return subprocess.run(cmd, capture_output=True).returncode == 0


CASES = [(b, u) for b in BACKENDS for u in USERS if u == "root" or _user_can_namespace()]


def run_as(user: str, backend: str, code: str, home: str | None = None) -> sandbox.RunResult:
    """run_program as this process (root) or, from root, as an ordinary user (nobody) with
    $HOME set, through the system interpreter (stdlib only: the sandbox needs nothing else)."""
    if user == "root" or os.geteuid() != 0:
        return run_program(code, limits=LIMITS, backend=backend)
    driver = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {SRC!r})
        from posttrain.data.sandbox import SandboxLimits, run_program
        r = run_program(sys.stdin.read(), limits=SandboxLimits(**{json.dumps(LIMITS.__dict__)}), backend={backend!r})
        print(json.dumps(r.__dict__))
        """
    )
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": home or "/nonexistent"}
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/usr/bin/python3", "-c", driver],
        input=code, capture_output=True, text=True, env=env, cwd="/", timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return sandbox.RunResult(**json.loads(proc.stdout))


def _ok(res: sandbox.RunResult) -> dict:
    assert res.status == "ok", (res.status, res.stderr[-1000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


WRITE_EVERYWHERE = textwrap.dedent(
    """
    import json, os
    out = {}
    for where in ("./w", "/tmp/t", os.path.expanduser("~/h"), "/dev/shm/s"):
        n = 0
        try:
            with open(where, "wb") as f:
                while n < 64 << 20:  # up to 64 MiB per place
                    f.write(b"x" * (1 << 20))
                    f.flush()
                    n += 1 << 20
        except OSError:
            pass
        out[where] = n
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("backend, user", CASES)
def test_total_writes_are_capped_and_stay_off_the_host_disk(backend, user):
    before = shutil.disk_usage(tempfile.gettempdir()).used
    out = _ok(run_as(user, backend, WRITE_EVERYWHERE))
    total = sum(out.values())
    assert 0 < total <= (LIMITS.disk_mb + 1) << 20, out  # /tmp (work dir, home) + 1 MiB /dev/shm
    assert out["./w"] > 0 and out["./w"] + out["/tmp/t"] + out["/tmp/home/h"] <= LIMITS.disk_mb << 20
    assert shutil.disk_usage(tempfile.gettempdir()).used - before < 32 << 20  # nothing landed on disk


@pytest.mark.parametrize("backend, user", CASES)
def test_unix_sockets_on_host_paths_and_abstract_ones_are_unreachable(backend, user, tmp_path):
    # Not under /tmp (always private to the sandbox): where host services keep their sockets.
    d = tempfile.mkdtemp(prefix="posttrain-sock-", dir="/run" if os.access("/run", os.W_OK) else Path.home())
    os.chmod(d, 0o777)
    path = os.path.join(d, "host.sock")
    name = f"\0posttrain-test-{os.getpid()}"
    servers = []
    try:
        for addr in (path, name):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(addr)
            s.listen(1)
            s.settimeout(0.3)
            servers.append(s)
        os.chmod(path, 0o777)
        code = textwrap.dedent(
            f"""
            import json, socket
            out = {{}}
            for addr in ({path!r}, {name!r}):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(addr); s.sendall(b"pwned"); out[repr(addr)] = "connected"
                except OSError as e:
                    out[repr(addr)] = type(e).__name__
            print(json.dumps(out))
            """
        )
        out = _ok(run_as(user, backend, code))
        assert "connected" not in out.values(), out
        for s in servers:
            with pytest.raises(TimeoutError):
                s.accept()
    finally:
        for s in servers:
            s.close()
        shutil.rmtree(d, ignore_errors=True)


NESTED_TMPFS = textwrap.dedent(
    """
    import ctypes, json, os
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    out = {"unshare": libc.unshare(0x10000000 | 0x00020000), "mounted": False, "mb": 0}  # NEWUSER|NEWNS
    if out["unshare"] == 0:
        for f, line in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            try:
                open(f"/proc/self/{f}", "w").write(line)
            except OSError:
                pass
        os.makedirs("/tmp/m", exist_ok=True)
        out["mounted"] = libc.mount(b"none", b"/tmp/m", b"tmpfs", 0, b"size=256m") == 0
        for i in range(32):  # files of 8 MiB each: past disk_mb in a tmpfs of its own
            try:
                with open(f"/tmp/m/{i}", "wb") as f:
                    f.write(b"x" * (8 << 20))
                out["mb"] += 8
            except OSError:
                break
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("backend, user", CASES)
def test_no_user_namespace_of_its_own_to_mount_an_uncapped_tmpfs(backend, user):
    out = _ok(run_as(user, backend, NESTED_TMPFS))
    assert out["unshare"] != 0 and not out["mounted"] and out["mb"] == 0, out


SYSV_SHM = textwrap.dedent(
    """
    import ctypes, json
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    mb = 0
    for _ in range(8):  # 64 MiB segments, touched then detached: outside RLIMIT_AS
        sid = libc.shmget(0, ctypes.c_size_t(64 << 20), 0o1600)
        if sid < 0:
            break
        addr = libc.shmat(sid, None, 0)
        ctypes.memset(addr, 1, 64 << 20)
        libc.shmdt(ctypes.c_void_p(addr))
        mb += 64
    print(json.dumps({"mb": mb, "msgget": libc.msgget(0, 0o1600)}))
    """
)


@pytest.mark.parametrize("backend, user", [*CASES, ("rlimits", USERS[0])])
def test_no_system_v_shared_memory_outside_the_memory_cap(backend, user):
    out = _ok(run_as(user, backend, SYSV_SHM))
    assert out == {"mb": 0, "msgget": -1}, out


def test_seccomp_filter_only_for_known_architectures():
    from posttrain.data.sandbox_mounts import seccomp_filter

    assert len(seccomp_filter("x86_64")) == 7 * 8 and len(seccomp_filter("aarch64")) == 7 * 8
    assert seccomp_filter("riscv64") == b""


FIND_HOST = textwrap.dedent(
    """
    import json, os
    out = {"home": os.path.expanduser("~"), "writable": [], "secret": None}
    out["home_entries"] = sorted(os.listdir(out["home"]))  # before the walk below writes probes
    for secret in SECRETS:
        try:
            out["secret"] = open(secret).read()
        except OSError:
            pass
    for root, dirs, files in os.walk("/"):
        if root.startswith("/proc"):
            dirs[:] = []
            continue
        if os.access(root, os.W_OK):
            try:
                open(os.path.join(root, ".probe"), "w").close()
                out["writable"].append(root)
            except OSError:
                pass
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("backend, user", CASES)
def test_host_home_is_invisible_and_no_host_path_is_writable(backend, user):
    home = tempfile.mkdtemp(prefix="posttrain-home-")
    os.makedirs(os.path.join(home, ".ssh"))
    secret = os.path.join(home, ".ssh", "id_rsa")
    Path(secret).write_text("PRIVATE KEY")
    if os.geteuid() == 0 and user == "user":
        for p in (home, os.path.join(home, ".ssh"), secret):
            os.chown(p, NOBODY, NOBODY)
    os.chmod(secret, 0o600)
    os.chmod(home, 0o755)
    try:
        code = FIND_HOST.replace("SECRETS", repr([secret, "/root/.bashrc", "/etc/shadow"]))
        out = _ok(run_as(user, backend, code, home=home))
        assert out["secret"] is None and out["home"] == "/tmp/home" and out["home_entries"] == []
        assert all(w.startswith(("/tmp", "/dev/shm")) for w in out["writable"]), out["writable"]
        assert "/tmp/work" in out["writable"]
        assert sorted(os.listdir(home)) == [".ssh"] and os.listdir(os.path.join(home, ".ssh")) == ["id_rsa"]
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_cases_cover_both_backends_as_root_and_as_a_user():
    if os.geteuid() != 0 or not BACKENDS:
        pytest.skip("needs root and an isolating backend to run the sandbox as another user")
    assert {b for b, _ in CASES} == set(BACKENDS) and {u for _, u in CASES} == {"root", "user"}


def test_code_reward_refuses_to_run_model_code_without_isolation(monkeypatch):
    from posttrain.data.rewards import build_reward
    from posttrain.data.rewards import code as code_module
    from posttrain.errors import ConfigError

    monkeypatch.setattr(code_module, "detect_backend", lambda: "rlimits")
    with pytest.raises(ConfigError, match="neither bubblewrap nor unshare"):
        build_reward("code")
    assert callable(build_reward("code", backend="rlimits"))  # an explicit, informed choice
