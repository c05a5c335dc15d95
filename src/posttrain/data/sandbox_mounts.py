"""The sandbox's view of the filesystem and the command lines that build it.

Both isolating backends give the program the same minimal root (issue #22): nothing of the
host beyond what running Python needs, and nothing writable on the host.

    /usr, /bin, /sbin, /lib*   read-only binds of the host's system directories
    <python prefix>            read-only bind of the interpreter's installation, when it
                               lives outside /usr (e.g. a pyenv build)
    /etc/ld.so.cache           read-only (the dynamic linker's library index), nothing else
                               of /etc
    /dev                       null, zero, full, random, urandom; read-only otherwise
    /dev/shm                   private tmpfs, 1 MiB
    /proc                      the program's own pid namespace
    /tmp                       private tmpfs of `SandboxLimits.disk_mb`: the only writable
                               place; holds the work dir /tmp/work (cwd, main.py) and an
                               empty home /tmp/home ($HOME)
    /                          read-only; /home, /root, /run, /var, host /tmp: absent

So host files (a user's home, SSH keys, token caches) cannot be read, no host path can be
written, no Unix-domain socket on a host path can be reached (the network namespace covers
abstract sockets and TCP/UDP), and everything the program writes lives in RAM within
`disk_mb` + 1 MiB — never on the host's disk, and never past its cap: the program may not
create a user namespace of its own (bwrap ``--disable-userns``; under unshare a user
namespace whose ``max_user_namespaces`` is 0), in which it could mount a tmpfs of its own.
"""

from __future__ import annotations

import os
import shutil

WORK = "/tmp/work"
HOME = "/tmp/home"
SHM_MB = 1
_SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")


def python_prefix(python: str) -> str | None:
    """The installation directory to expose for `python`, or None when /usr covers it."""
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
    if prefix in ("/", "/usr") or prefix.startswith("/usr/"):
        return None
    return prefix


# Runs as (namespace) root inside the new mount namespace, with arguments
# DISK_MB PYTHON_PREFIX UID then the command. It builds the minimal root on a tmpfs mounted
# over the host work dir (the shell's cwd: "." still names the old directory, whose main.py
# is copied in), pivots into it and unmounts the host's root. Exit 125: the setup failed.
_MOUNT_SCRIPT = r"""
W0="$PWD"; S="$1"; P="$2"; U="$3"; shift 3
mount --make-rprivate / && mount -t tmpfs -o size=1m,mode=0755 tmpfs "$W0" || exit 125
R="$W0"
ro_bind() { mkdir -p "$R$1" && mount --bind "$1" "$R$1" && mount -o remount,bind,ro,nosuid,nodev "$R$1"; }
for d in usr bin sbin lib lib32 lib64 libx32; do
  if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$R/$d" || exit 125
  elif [ -d "/$d" ]; then ro_bind "/$d" || exit 125; fi
done
[ -z "$P" ] || ro_bind "$P" || exit 125
mkdir -p "$R/etc" "$R/dev" "$R/proc" "$R/tmp" || exit 125
if [ -f /etc/ld.so.cache ]; then
  touch "$R/etc/ld.so.cache" && mount --bind /etc/ld.so.cache "$R/etc/ld.so.cache" &&
  mount -o remount,bind,ro "$R/etc/ld.so.cache" || exit 125
fi
for n in null zero full random urandom; do touch "$R/dev/$n" && mount --bind "/dev/$n" "$R/dev/$n" || exit 125; done
mount -t proc -o nosuid,nodev,noexec proc "$R/proc" || exit 125
mount -t tmpfs -o "size=${S}m,mode=1777,nosuid,nodev" tmpfs "$R/tmp" || exit 125
mkdir "$R/dev/shm" && mount -t tmpfs -o "size=SHM_MBm,mode=1777,nosuid,nodev" tmpfs "$R/dev/shm" || exit 125
mkdir "$R/tmp/work" "$R/tmp/home" && cp ./main.py "$R/tmp/work/main.py" || exit 125
[ -z "$U" ] || chown "$U:$U" "$R/tmp/work" "$R/tmp/home" || exit 125
cd "$R" && mkdir .old && pivot_root . .old && umount -l /.old && rmdir /.old &&
  mount -o remount,ro,bind / && cd /tmp/work || exit 125
# Not exec: this shell stays pid 1 so a signal death of the program comes back as 128+signo
# (unshare itself cannot re-raise SIGKILL faithfully).
"$@"; exit $?
""".replace("SHM_MB", str(SHM_MB))


def _unshare_prefix() -> list[str]:
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return [
        "unshare",
        *user,
        "--mount",
        "--net",
        "--pid",
        "--ipc",
        "--uts",
        "--fork",
        "--kill-child",
        "--mount-proc",
    ]


def unshare_setup(disk_mb: int, python: str, uid: int | None) -> list[str]:
    """unshare + the mount script with its arguments; the command to run follows."""
    prefix = python_prefix(python) or ""
    owner = "" if uid is None else str(uid)
    return _unshare_prefix() + ["/bin/sh", "-c", _MOUNT_SCRIPT, "sh", str(int(disk_mb)), prefix, owner]


# Runs as the program's user, last before the program: puts it in a user namespace of its
# own whose max_user_namespaces is 0, so it cannot create one itself (in a user namespace
# of its own it could mount a tmpfs outside `disk_mb` and fill the RAM), and drops every
# capability. Where this user may not create user namespaces at all, neither can the
# program, and it is exec'd directly.
_NO_USERNS_SCRIPT = r"""
DROP='exec setpriv --inh-caps=-all --bounding-set=-all --no-new-privs "$@"'
if unshare --user --map-root-user true 2>/dev/null; then
  exec unshare --user --map-root-user /bin/sh -c \
    "echo 0 > /proc/sys/user/max_user_namespaces || exit 125; $DROP" sh "$@"
fi
eval "$DROP"
"""


def _setpriv_prefix(uid: int) -> list[str]:
    """As root: drop to `uid` with no capabilities and no_new_privs; else nothing."""
    if os.geteuid() != 0:
        return []
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
    ]


def _no_userns_chain(uid: int | None) -> list[str]:
    """As root: drop to `uid` (keeping the bounding set for the next step), then
    `_NO_USERNS_SCRIPT`; as an ordinary user (already root of unshare's user namespace,
    with every capability there) the script alone. The program ends with no capabilities."""
    drop = [] if uid is None else [
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all", "--no-new-privs"
    ]  # fmt: skip
    return [*drop, "/bin/sh", "-c", _NO_USERNS_SCRIPT, "sh"]


def _bwrap_args(workdir: str, disk_mb: int, python: str) -> list[str]:
    # --disable-userns: no user namespace of its own, where it could mount a tmpfs past disk_mb.
    args = ["--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL"]  # fmt: skip
    for d in _SYSTEM_DIRS:
        path = "/" + d
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    prefix = python_prefix(python)
    if prefix:
        args += ["--ro-bind", prefix, prefix]
    mb = 1 << 20
    args += [
        "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
        "--dev", "/dev",
        "--proc", "/proc",
        "--size", str(int(disk_mb) * mb), "--tmpfs", "/tmp",
        "--size", str(SHM_MB * mb), "--tmpfs", "/dev/shm",
        "--remount-ro", "/dev",
        "--dir", WORK,
        "--dir", HOME,
        "--ro-bind", os.path.join(workdir, "main.py"), f"{WORK}/main.py",
        "--remount-ro", "/",
        "--chdir", WORK,
        "--clearenv",
        "--setenv", "HOME", HOME,
    ]  # fmt: skip
    return args


# System V shared memory and message queues live outside the program's address space (so
# outside RLIMIT_AS) until its IPC namespace dies with it: segments created, touched and
# detached in a loop would fill the RAM. A seccomp filter, installed by the bootstrap below
# before any of the program's code runs (no_new_privs is set, so no privilege is needed),
# makes shmget and msgget fail with EPERM. Syscall numbers per architecture: (audit arch,
# shmget, msgget).
_SYSV_IPC = {"x86_64": (0xC000003E, 29, 68), "aarch64": (0xC00000B7, 194, 186)}


def seccomp_filter(machine: str | None = None) -> bytes:
    """The BPF program (struct sock_filter[]) denying shmget/msgget; b"" on an architecture
    not listed in _SYSV_IPC (then no filter is installed)."""
    import platform
    import struct

    numbers = _SYSV_IPC.get(machine or platform.machine())
    if numbers is None:
        return b""
    arch, shmget, msgget = numbers
    ld_abs, jeq, ret = 0x20, 0x15, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    prog = [
        (ld_abs, 0, 0, 4),  # seccomp_data.arch
        (jeq, 0, 3, arch),  # another ABI (e.g. x32): allow
        (ld_abs, 0, 0, 0),  # seccomp_data.nr
        (jeq, 2, 0, shmget),
        (jeq, 1, 0, msgget),
        (ret, 0, 0, allow),
        (ret, 0, 0, deny),
    ]
    return b"".join(struct.pack("<HBBI", *ins) for ins in prog)


# The program's first act is to write one byte to the start pipe and close it. A run whose
# byte never arrived failed inside the launcher chain (a sandbox error); once it arrived,
# every outcome belongs to the program, so no exit code it picks can pose as an
# infrastructure failure. Before it, the seccomp filter above is installed (a failure there
# exits before the byte: a sandbox error).
_BOOTSTRAP = """\
import os as _o
if {filter!r}:
    import ctypes as _c
    class _P(_c.Structure):
        _fields_ = [("n", _c.c_ushort), ("f", _c.c_void_p)]
    _b = _c.create_string_buffer({filter!r}, len({filter!r}))
    _p = _P(len({filter!r}) // 8, _c.addressof(_b))
    _l = _c.CDLL(None, use_errno=True)
    if _l.prctl(38, 1, 0, 0, 0) or _l.prctl(22, 2, _c.byref(_p), 0, 0):  # NO_NEW_PRIVS; SECCOMP filter
        raise SystemExit(125)
    del _c, _P, _b, _p, _l
_o.write({fd}, b'S'); _o.close({fd}); del _o
__file__ = 'main.py'; exec(compile(open('main.py', encoding='utf-8').read(), 'main.py', 'exec'))
"""


def command(backend: str, python: str, workdir: str, uid: int, start_fd: int, disk_mb: int) -> list[str]:
    """The argv that runs main.py of `workdir` under `backend` as `uid`."""
    # -I: ignore PYTHON* env vars and the user site; -S: no site-packages (stdlib only);
    # -B: no .pyc writes.
    prog = [python, "-I", "-S", "-B", "-c", _BOOTSTRAP.format(fd=start_fd, filter=seccomp_filter())]
    if backend == "bwrap":
        # As root, drop to the run's uid *before* bwrap: bwrap then maps that uid into its
        # user namespace, so host files keep their real owners (run as root, bwrap would map
        # the sandbox uid to root and let it read root's 0600 files).
        bwrap = shutil.which("bwrap") or "bwrap"
        return _setpriv_prefix(uid) + [bwrap, *_bwrap_args(workdir, disk_mb, python), *prog]
    if backend == "unshare":
        env = ["/usr/bin/env", "-i", f"HOME={HOME}"]  # a clean environment, an empty home
        owner = uid if os.geteuid() == 0 else None
        return unshare_setup(disk_mb, python, owner) + [*env, *_no_userns_chain(owner), *prog]
    return _setpriv_prefix(uid) + prog
