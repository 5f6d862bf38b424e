"""Run one container of a Pod the way a container runtime would, without an image: the node agent's shim.

``python podsandbox.py SPEC.json`` (standard library only, so it starts in milliseconds) reads what the node agent
prepared for one container, then:

1. enters new mount, UTS and PID namespaces (``unshare(2)``) and makes every mount private, so nothing it mounts
   is seen outside;
2. builds a root file system on a tmpfs: every top-level entry of the host's ``/`` is bind-mounted into it (the
   host's programs and the project's virtualenv stand in for the image), and each volume is bind-mounted at its
   ``mountPath``; a directory that must be created where the host has none (``/scratch``, ``/etc/finetune``,
   ``/var/run/secrets/...``) is made by "shadowing" its parent: a tmpfs replaces the parent and re-binds the
   parent's entries, so the host's own ``/etc`` or ``/dev`` is never written to;
3. binds the agent's per-Pod ``/etc/hosts`` and the container's termination-message file, remounts ``readOnly``
   volumes read-only, sets the Pod's hostname and ``chroot``s into the new root;
4. forks the container process, which becomes PID 1 of the new PID namespace (as in a real container, a signal
   it has no handler for is ignored, SIGKILL excepted), mounts a fresh ``/proc`` and execs the command.

The shim stays outside as the container's parent: it forwards SIGTERM/SIGINT to PID 1, and exits with the
container's status (128+N for a signal). The container dies with the shim (``PR_SET_PDEATHSIG``), and every process
in the PID namespace dies with PID 1, so nothing outlives the container. A failure before the command started is
written to ``SPEC["start_error_file"]`` (the kubelet's StartError) and the shim exits 128.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import stat
import sys
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
START_ERROR_EXIT = 128

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            ctypes.c_ulong(flags),
            data.encode() if data is not None else None,
        ),
        f"mount {source or fstype} on {target}",
    )


class RootFs:
    """The container's root file system under ``root`` (a host directory), built from binds of the host's."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        # Container paths whose content mirrors a host directory through a bind mount (not ours to write into),
        # and container paths that are ours: tmpfs we mounted, volumes, directories we created inside those.
        self.mirrors: dict[str, str] = {}
        self.private: set[str] = {"/"}

    def host(self, path: str) -> str:
        return self.root + path if path != "/" else self.root

    def build(self) -> None:
        mount("tmpfs", self.root, "tmpfs", MS_NOSUID, "mode=755")
        # A recursive bind of the host's /tmp (where this root lives) must not copy the new root into itself.
        mount(None, self.root, None, MS_UNBINDABLE)
        self._fill("/", "/")

    def _fill(self, path: str, source: str) -> None:
        """Re-create every entry of the host directory ``source`` in the (tmpfs) container directory ``path``."""
        for name in sorted(os.listdir(source)):
            src = os.path.join(source, name)
            dst = os.path.join(path, name)
            if dst == "/proc":  # the container mounts a /proc of its own PID namespace
                os.mkdir(self.host(dst), 0o555)
                continue
            self._replicate(src, dst)

    def _replicate(self, src: str, dst: str) -> None:
        st = os.lstat(src)
        target = self.host(dst)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), target)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(target, stat.S_IMODE(st.st_mode))
            mount(src, target, None, MS_BIND | MS_REC)
            self.mirrors[dst] = src
        else:  # files, device nodes, sockets: a file to bind onto
            with open(target, "w"):
                pass
            try:
                mount(src, target, None, MS_BIND)
            except OSError:
                os.unlink(target)  # e.g. a socket that vanished meanwhile; the container does without it

    def _owner(self, path: str) -> str:
        """The deepest mirror or private path at or above ``path``."""
        probe = path
        while True:
            if probe in self.private or probe in self.mirrors:
                return probe
            probe = os.path.dirname(probe)

    def _make_writable(self, path: str) -> None:
        """Make the container directory ``path`` ours, shadowing the host directory it mirrors if need be."""
        owner = self._owner(path)
        if owner in self.private:
            return
        if owner != path:
            # A directory inside a mirror: shadow its parent first, which turns ``path`` itself into a mirror.
            self._make_writable(os.path.dirname(path))
            if path in self.private:
                return
        source = self.mirrors.pop(path)
        mount("tmpfs", self.host(path), "tmpfs", MS_NOSUID, f"mode={stat.S_IMODE(os.stat(source).st_mode):o}")
        self.private.add(path)
        self._fill(path, source)

    def ensure(self, path: str, *, directory: bool) -> str:
        """Resolve the container path (symlinks followed inside the container's root), creating what is missing;
        return the host path of the result."""
        parts = [p for p in path.split("/") if p]
        current = "/"
        hops = 0
        while parts:
            name = parts.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                current = os.path.dirname(current)
                continue
            candidate = os.path.join(current, name)
            host = self.host(candidate)
            if os.path.islink(host):
                hops += 1
                if hops > 40:
                    raise OSError(errno.ELOOP, f"too many symlinks resolving {path}")
                link = os.readlink(host)
                if link.startswith("/"):
                    current = "/"
                parts = [p for p in link.split("/") if p] + parts
                continue
            if not os.path.lexists(host):
                self._make_writable(current)
                if parts or directory:
                    os.mkdir(host, 0o755)
                    self.private.add(candidate)  # created by us, inside a directory of ours
                else:
                    with open(host, "w"):
                        pass
            current = candidate
        return self.host(current)

    def bind(self, source: str, target: str, *, recursive: bool = True) -> str:
        host = self.ensure(target, directory=os.path.isdir(source))
        mount(source, host, None, MS_BIND | (MS_REC if recursive else 0))
        if os.path.isdir(source):
            # Ours now: a volume (or a nested mount path inside it) may be created within it.
            self.mirrors.pop(target, None)
            self.private.add(os.path.normpath(target))
        return host

    def tmpfs(self, target: str, options: str) -> str:
        host = self.ensure(target, directory=True)
        mount("tmpfs", host, "tmpfs", MS_NOSUID | MS_NODEV, options or None)
        self.mirrors.pop(target, None)
        self.private.add(os.path.normpath(target))
        return host


def prepare(spec: dict[str, Any]) -> None:
    """Everything up to the fork: namespaces, root file system, volumes, hostname, chroot."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWPID), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    rootfs = RootFs(spec["rootfs"])
    rootfs.build()
    read_only: list[str] = []
    # Parents before children, as runc mounts them: /etc/finetune before /etc/finetune/deepspeed.
    mounts = sorted(spec["mounts"], key=lambda m: len([p for p in m["target"].split("/") if p]))
    # Every mount point first, then the mounts: shadowing a directory (say /dev, for /dev/termination-log) after
    # something was mounted inside it (a memory emptyDir on /dev/shm) would hide that mount.
    for m in mounts:
        rootfs.ensure(m["target"], directory=m.get("tmpfs") is not None or os.path.isdir(m["source"]))
    for m in mounts:
        if m.get("tmpfs") is not None:
            host = rootfs.tmpfs(m["target"], m["tmpfs"])
        else:
            host = rootfs.bind(m["source"], m["target"])
        if m.get("readOnly"):
            read_only.append(host)
    # The host paths that stand in for the image stay visible where a volume covers one of their parents.
    for path in spec.get("keep") or []:
        if any(path == m["target"] or path.startswith(m["target"].rstrip("/") + "/") for m in mounts):
            rootfs.ensure(path, directory=True)
            rootfs.bind(path, path)
    for host in read_only:
        mount(None, host, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    hostname = spec["hostname"].encode()
    _check(_libc.sethostname(hostname, len(hostname)), "sethostname")
    os.chroot(rootfs.root)
    os.chdir("/")


def run_container(spec: dict[str, Any], error_pipe: int) -> None:
    """In the forked child (PID 1 of the new namespace): /proc, working directory, exec. Never returns."""
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV)
        os.chdir(spec.get("workingDir") or "/")
        env = spec["env"]
        command = spec["command"]
        if not command:
            raise OSError(errno.ENOEXEC, "no command: the node agent runs no image entrypoint")
        os.execvpe(command[0], command, env)
    except BaseException as exc:  # anything that kept the command from starting is reported
        message = f"{type(exc).__name__}: {exc}"
        os.write(error_pipe, message.encode()[:4000])
        os._exit(START_ERROR_EXIT)


def main(argv: list[str]) -> int:
    with open(argv[1]) as handle:
        spec = json.load(handle)
    # Opened before the chroot: the agent's directory may not be visible from inside the container's root.
    error_file = open(spec["start_error_file"], "w")  # noqa: SIM115 - written at most once, closed at exit
    try:
        prepare(spec)
    except Exception as exc:
        error_file.write(f"sandbox: {exc}")
        error_file.close()
        print(f"podsandbox: {exc}", file=sys.stderr, flush=True)
        return START_ERROR_EXIT
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        run_container(spec, write_end)
    os.close(write_end)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    # The pipe closes on a successful exec (O_CLOEXEC); anything read from it is why the exec did not happen.
    failure = b""
    while True:
        try:
            chunk = os.read(read_end, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        failure += chunk
    os.close(read_end)
    if failure:
        error_file.write(failure.decode(errors="replace"))
    error_file.close()
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
