"""
Run an untrusted Python program (a model's code completion plus its tests) and say whether it passed.

    from sandbox import run_python
    r = run_python(prompt + completion + "\\n" + test + f"\\ncheck({entry_point})\\n", timeout=10)
    r.status, r.reason          # 'pass' | 'fail' | 'timeout', and why

What it does, every run:
  - a fresh temporary directory (deleted afterwards, whatever the program left in it) holds the program and
    a small launcher; the program runs in its empty subdirectory work/ (also HOME and TMPDIR), as module
    '__sandbox__' (an `if __name__ == "__main__":` block of a completion does not run, as in human-eval);
  - the environment is built from nothing: PATH=/usr/bin:/bin, LANG/LC_ALL=C.UTF-8, HOME, TMPDIR; not one
    variable of the parent's (tokens, keys, PYTHONPATH, PYTHONOPTIMIZE) reaches it; `python -I -B` also
    ignores PYTHON* variables and the user's site-packages; stdin is /dev/null; of the parent's descriptors
    only stdout, stderr and the result pipe are open;
  - limits set by the launcher before the program's first line, soft = hard so that it cannot raise them:
    address space (memory_mb: MemoryError), size of any one file written (max_file_mb: 'File too large'),
    processes of its uid (max_procs: a fork bomb gets BlockingIOError), no core dumps; CPU seconds
    (default timeout + 1: SIGXCPU, then SIGKILL a second later);
  - a wall-clock timeout: at the limit the whole process group is SIGKILLed (and, see below, the whole PID
    namespace); stdout and stderr are read up to max_output bytes each, and a program that writes more is
    killed (a 100 MB flood costs max_output of memory, not 100 MB);
  - where the OS allows (checked once at run time, see capabilities()): its own network namespace (no
    interface but a downed loopback: every connection fails, 127.0.0.1 included) and PID namespace (when
    the launcher dies the kernel kills every process it started, setsid() or not), via `unshare`;
    when this process is root, the program also runs as an unprivileged uid of its own (random, > 100000,
    no groups): it cannot write or delete files of others that are not world-writable, read other users'
    /proc/PID/environ, or signal other processes. That needs an interpreter every user can read: this
    Python when it is, else the system's python3 (a pyenv under a 0700 /root is not readable);
  - pass: the program ran to its end without an exception AND the launcher then wrote a per-run random
    token (128 bits, handed over on a pipe that is closed before the program starts) to a result pipe AND
    the exit code is 0. sys.exit(0) is an exception (fail); os._exit(0) before the end never writes the
    token (fail); a process it forks never writes it; replacing print, sys.stdout, builtins, AssertionError
    or os.write changes nothing (the launcher keeps its own references; the token goes to a descriptor).

What it does not guarantee: it is not a security sandbox. The program runs in the same process as the
launcher, so code written to defeat the harness can: find the token in the launcher's memory (e.g. through
sys._getframe or gc) and write it itself; return an object whose __eq__ is always True so that `assert
candidate(x) == y` holds. It can read every world-readable file (the repository, ../shared/data, /etc) and
write in world-writable folders (/tmp, /dev/shm: what it leaves there stays). Without root there is no uid
of its own: the program can write and delete whatever the user running the eval can, and a process that
leaves its process group outlives the run when no PID namespace could be made. Without `unshare` (or where
the kernel forbids namespaces) the network is open. Run untrusted models' code inside a container or VM
without credentials as well; this module stops accidents and simple cheats, not attackers.
"""
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

UNSHARE = shutil.which("unshare")

# the launcher: set the limits, drop to the sandbox uid, run the program, and only then write the token.
# Every name it needs after the program ran is bound to a local first (the program may replace os.write,
# builtins, sys.exit, ...).
LAUNCHER = r'''
import os, resource, sys
def main():
    token_fd, result_fd, uid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    cpu, mem, fsize, nproc = (int(x) for x in sys.argv[4:8])
    if os.getpid() == 1:  # a PID namespace's init ignores the signals it has no handler for (SIGXCPU):
        child = os.fork()  # the program runs as its child; init reaps, and exits as the child did
        if child:
            os.close(token_fd)
            os.close(result_fd)
            while True:
                pid, status = os.wait()
                if pid == child:
                    code = os.waitstatus_to_exitcode(status)
                    os._exit(code if code >= 0 else 128 - code)
    token = os.read(token_fd, 64)
    os.close(token_fd)
    write, _exit, BE, typename, getpid = os.write, os._exit, BaseException, type, os.getpid
    me = getpid()  # a process the program forks never writes to the result pipe
    flush_out, flush_err = sys.stdout.flush, sys.stderr.flush
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at cpu seconds, SIGKILL a second later
    for res, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (val, val))
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    if nproc >= 0:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    os.chdir(sys.argv[9])
    with open(sys.argv[8], encoding="utf-8") as f:
        src = f.read()
    sys.argv = ["program.py"]
    g = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    try:
        exec(compile(src, "program.py", "exec"), g)
    except BE as e:
        if getpid() != me:
            _exit(1)
        try:
            why = typename(e).__name__ + (": " + str(e)[:300] if str(e) else "")
        except BE:
            why = "an exception"
        try:
            flush_out()
            flush_err()
            write(result_fd, ("FAIL " + why).encode("utf-8", "replace"))
        finally:
            _exit(1)
    if getpid() != me:
        _exit(1)
    try:
        flush_out()
        flush_err()
    except BE:
        pass
    write(result_fd, b"PASS " + token)
    _exit(0)
main()
'''


@dataclass
class Result:
    status: str          # 'pass' | 'fail' | 'timeout'
    reason: str          # '' for a pass; else what happened
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    workdir: str = ""    # the temporary directory it ran in (deleted by the time this is returned)


_CAPS = None


def _uid_for_run():
    return 100000 + secrets.randbelow(900000)


def _command(mode, args):
    """The argv that starts `args` (python ...) in the given mode's namespaces."""
    if mode.get("unshare"):
        flags = ["--pid", "--fork", "--kill-child", "--net"] + (["--map-root-user"] if mode["userns"] else [])
        return [UNSHARE, *flags, "--", *args]
    return list(args)


def capabilities():
    """What this machine lets the sandbox do, probed once with real runs (the first candidate that works is
    kept): {'unshare': own network and PID namespaces, 'userns': made through a user namespace (not root),
    'drop_uid': runs as an unprivileged uid of its own (root only), 'python': the interpreter,
    'net_isolated': a connection to 127.0.0.1 fails}. With drop_uid the interpreter and its standard library
    must be readable by any user: this Python when it is (a pyenv under a 0700 /root is not), else the
    system's python3."""
    global _CAPS
    if _CAPS is not None:
        return _CAPS
    root = os.geteuid() == 0
    pythons = [sys.executable] + [p for p in (shutil.which("python3", path="/usr/bin:/bin"),)
                                  if p and os.path.realpath(p) != os.path.realpath(sys.executable)]
    candidates = []
    if root:
        candidates += [dict(unshare=True, userns=False, drop_uid=True, python=py) for py in pythons if UNSHARE]
        candidates += [dict(unshare=False, userns=False, drop_uid=True, python=py) for py in pythons]
    if UNSHARE:
        candidates.append(dict(unshare=True, userns=not root, drop_uid=False, python=sys.executable))
    candidates.append(dict(unshare=False, userns=False, drop_uid=False, python=sys.executable))
    for mode in candidates:
        r = _run(PROBE, mode, timeout=20)
        isolated = r.stdout.strip() == "unreachable"
        if r.status == "pass" and (isolated or not mode["unshare"]):
            _CAPS = dict(mode, net_isolated=isolated)
            return _CAPS
    _CAPS = dict(candidates[-1], net_isolated=False)
    return _CAPS


PROBE = """import collections, hashlib, heapq, itertools, json, math, re, socket, string
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("127.0.0.1", 9))
    print("open")
except OSError as e:
    print("unreachable" if e.errno in (101, 99) else "open")
"""


def _count_procs(uid):
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _kill_uid(uid):
    """SIGKILL every process of uid (the sandbox's own uid: nothing else runs as it)."""
    for _ in range(20):
        found = False
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.stat(f"/proc/{d}").st_uid == uid:
                        found = True
                        os.kill(int(d), signal.SIGKILL)
                except OSError:
                    pass
        if not found:
            return
        time.sleep(0.01)


def _rmtree(path):
    def fix(func, p, exc):  # a program may leave a folder without permissions
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        except OSError:
            pass
        try:
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=fix)


def run_python(program, timeout=10.0, memory_mb=2048, max_output=1 << 20, max_procs=32, max_file_mb=16,
               cpu_seconds=None):
    """Run program (Python source) in the sandbox; a Result. pass = it ran to the end without an exception
    (see the module's docstring for how that is established and what it does not guarantee). Limits: timeout
    (wall clock, seconds), memory_mb (address space), max_output (bytes of stdout, and of stderr), max_procs
    (processes of its uid), max_file_mb (any one file written), cpu_seconds (default: timeout + 1)."""
    return _run(program, capabilities(), timeout, memory_mb, max_output, max_procs, max_file_mb, cpu_seconds)


def _run(program, mode, timeout=10.0, memory_mb=2048, max_output=1 << 20, max_procs=32, max_file_mb=16,
         cpu_seconds=None):
    t0 = time.monotonic()
    root = tempfile.mkdtemp(prefix="sandbox-")
    uid = _uid_for_run() if mode["drop_uid"] else -1
    token = secrets.token_hex(16).encode()
    fds = []
    proc = None
    try:
        os.chmod(root, 0o711)
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        for name, text in (("launcher.py", LAUNCHER), ("program.py", program)):
            with open(os.path.join(root, name), "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(os.path.join(root, name), 0o644)
        if uid >= 0:
            os.chown(work, uid, uid)
        # processes: with a uid of its own the count is the sandbox's alone; otherwise it is every process of
        # this user, so the limit is what already runs plus max_procs
        nproc = max_procs if uid >= 0 or mode["userns"] else _count_procs(os.getuid()) + max_procs
        token_r, token_w = os.pipe()
        result_r, result_w = os.pipe()
        fds += [token_r, token_w, result_r, result_w]
        os.write(token_w, token)
        os.close(token_w)
        fds.remove(token_w)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": work, "TMPDIR": work}
        args = [mode["python"], "-I", "-B", os.path.join(root, "launcher.py"), str(token_r), str(result_w),
                str(uid), str(cpu_seconds or int(timeout) + 1), str(memory_mb << 20), str(max_file_mb << 20),
                str(nproc), os.path.join(root, "program.py"), work]
        proc = subprocess.Popen(_command(mode, args), cwd=work, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(token_r, result_w),
                                start_new_session=True)
        for fd in (token_r, result_w):
            os.close(fd)
            fds.remove(fd)
        out, timed_out, flooded = _collect(proc, result_r, t0 + timeout, max_output)
        _kill(proc, uid, mode)
        proc.wait()
    finally:
        if proc is not None:
            if proc.poll() is None:
                _kill(proc, uid, mode)
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        _rmtree(root)
    rc = proc.returncode
    stdout, stderr = (out[k].decode("utf-8", "replace") for k in ("stdout", "stderr"))
    result = bytes(out["result"])
    status, reason = "fail", f"exited with code {rc} before the program's end (no pass token)"
    if timed_out:
        status, reason = "timeout", f"killed after the {timeout:g} s wall-clock limit"
    elif flooded:
        reason = f"output over the {max_output}-byte limit on {flooded}: killed"
    elif result == b"PASS " + token and rc == 0:
        status, reason = "pass", ""
    elif rc is not None and (rc < 0 or mode["unshare"] and rc > 128):
        sig = -rc if rc < 0 else rc - 128
        name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
        reason = f"killed by {name}" + {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)"}.get(name, "")
    elif result.startswith(b"FAIL "):
        reason = result[5:].decode("utf-8", "replace")
    elif result.startswith(b"PASS "):
        reason = f"wrong pass token (exit code {rc})"
    return Result(status, reason, rc, stdout, stderr, time.monotonic() - t0, root)


def _collect(proc, result_fd, deadline, cap):
    """Read stdout, stderr and the result pipe until they close or the deadline; keep at most cap bytes of
    each (the result pipe: 4 kB). (dict of bytes, timed out, name of the stream that overflowed or None)."""
    sel = selectors.DefaultSelector()
    streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr", result_fd: "result"}
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    out = {name: bytearray() for name in streams.values()}
    open_fds, exited_at = set(streams), None
    try:
        while open_fds:
            now = time.monotonic()
            if now >= deadline:
                return out, True, None
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:  # something it started holds the pipes
                break
            for key, _ in sel.select(min(deadline - now, 0.1)):
                fd = key.fd
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    open_fds.discard(fd)
                    continue
                name = streams[fd]
                limit = 4096 if name == "result" else cap
                room = limit - len(out[name])
                out[name] += chunk[:max(room, 0)]
                if len(chunk) > room and name != "result":
                    return out, False, name
    finally:
        sel.close()
    return out, False, None


def _kill(proc, uid, mode):
    """SIGKILL the process group (with a PID namespace the kernel then kills everything in it), and every
    process of the sandbox's own uid (for processes that left the group where there is no PID namespace)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    if uid >= 0 and not mode.get("unshare"):
        _kill_uid(uid)
