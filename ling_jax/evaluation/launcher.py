"""The child side of the sandbox: limits, guards, then the program; run as a script, standard library only.

`ling_jax.evaluation.sandbox` starts this file as `python -I -B launcher.py RESULT_FD` in a new session
and a fresh working directory, with a stripped environment, and writes one JSON object to its stdin:
`{"program": FILE, "nonce": STR, "limits": {...}}`. The launcher then, in this order:

1. sets the resource limits (address space, CPU seconds, processes, file size, no core files);
2. moves into a new network namespace (`unshare(CLONE_NEWNET)`, with a new user namespace when not
   root) where the kernel allows it: no interface but a downed loopback;
3. installs an audit hook (PEP 578) that refuses, for the program's whole life: creating sockets,
   creating processes (fork, exec, spawn, `subprocess`, `os.system`), signalling other processes,
   loading C code through `ctypes`, and writing, removing, renaming or changing files outside the
   working directory. A refused operation raises `PermissionError` and marks the run `blocked`,
   even if the program catches the error;
4. compiles and runs the program as `__main__`, then writes the verdict to `RESULT_FD` (a pipe no
   one else reads): `{"status": "passed", "nonce": NONCE}` only when the program ran to its last
   line, else the failure kind (`assertion`, `exception`, `memory`, `syntax`, `early_exit`,
   `blocked`) and a short message; then `os._exit`, so no thread or atexit hook of the program
   runs after the verdict.

The nonce comes from the parent through stdin and never appears in the program, so output that a
program prints cannot pass for the verdict. This is defence in depth for model-written code, not a
security boundary against an attacker who targets this harness (see docs/evaluation.md).
"""

import builtins
import json
import os
import resource
import sys

_STATUS_KEYS = ("status", "message")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Audit events that change the file system at their first argument (a path); checked against the workdir.
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                "os.symlink", "os.link", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile",
                "shutil.copytree", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr"}
_TWO_PATH_EVENTS = {"os.rename", "os.symlink", "os.link", "shutil.move", "shutil.copyfile", "shutil.copytree"}
_PROCESS_EVENTS = {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                   "subprocess.Popen", "os.startfile", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
                   "os.setuid", "os.setgid", "os.chroot", "os.pidfd_open"}
_BLOCKED_MODULES = {"cffi", "_cffi_backend"}  # C code without ctypes' audit events
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000


def set_limits(limits):
    """Applies the resource limits of a `sandbox.Limits` record (as a dict)."""
    cpu = int(limits["cpu_seconds"])
    for what, soft, hard in ((resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"]),
                             (resource.RLIMIT_CPU, cpu, cpu + 1),
                             (resource.RLIMIT_FSIZE, limits["file_bytes"], limits["file_bytes"]),
                             (resource.RLIMIT_NPROC, limits["processes"], limits["processes"]),
                             (resource.RLIMIT_CORE, 0, 0)):
        _, ceiling = resource.getrlimit(what)  # an unprivileged process cannot raise its hard limit
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(what, (soft, hard))


def isolate_network():
    """Enters a new network namespace; returns "namespace", or "guard" where the kernel refuses."""
    import ctypes  # imported before the audit hook forbids it

    libc = ctypes.CDLL(None, use_errno=True)
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET
    return "namespace" if libc.unshare(flags) == 0 else "guard"


def _writes(args):
    """Whether the arguments of an `open` audit event ask for writing."""
    mode, flags = args[1], args[2]
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _file_violation(event, args, inside):
    """What a file-system audit event does outside the working directory (None: nothing)."""
    if event == "open" and args and _writes(args) and not inside(args[0]):
        return f"writing {args[0]!r} outside the working directory"
    if event in _PATH_EVENTS and args and not inside(args[0]):
        return f"{event} of {args[0]!r} outside the working directory"
    if event in _TWO_PATH_EVENTS and len(args) > 1 and not inside(args[1]):
        return f"{event} to {args[1]!r} outside the working directory"
    return None


def _other_violation(event, args):
    """The socket, process, signal or C-code audit event the sandbox refuses (None: allowed)."""
    if event == "socket.__new__":
        return "creating a socket"
    if event in _PROCESS_EVENTS and not (event == "os.kill" and args and args[0] == os.getpid()):
        return event
    if event == "import" and args and str(args[0]).split(".")[0] in _BLOCKED_MODULES:
        return f"importing {args[0]}"
    if event.startswith("ctypes."):
        return event
    return None


def make_guard(workdir, violations):
    """The audit hook: refuses what the module docstring lists and records it in `violations`."""
    root = os.path.realpath(workdir)
    state = {"on": True}

    def inside(path):
        if isinstance(path, int):
            return True  # an fd: opening it was checked already
        try:
            full = os.path.realpath(os.path.join(root, os.fsdecode(path)))
        except (TypeError, ValueError):
            return False
        return full == root or full.startswith(root + os.sep) or full == os.devnull

    def refuse(what):
        violations.append(what)
        raise PermissionError(f"sandbox: {what} is not allowed")

    def hook(event, args):
        if not state["on"]:
            return
        what = _file_violation(event, args, inside) or _other_violation(event, args)
        if what:
            refuse(what)

    return hook, state


def classify(error):
    """The failure kind and message of an exception that escaped the program."""
    if isinstance(error, SystemExit):
        return "early_exit", f"the program exited (code {error.code!r}) before its tests finished"
    if isinstance(error, AssertionError):
        return "assertion", f"AssertionError: {error}"[:500]
    if isinstance(error, MemoryError):
        return "memory", "MemoryError"
    if isinstance(error, SyntaxError):
        return "syntax", f"{type(error).__name__}: {error}"[:500]
    if isinstance(error, RecursionError):
        return "exception", "RecursionError"
    return "exception", f"{type(error).__name__}: {error}"[:500]


def run(config, result_fd):
    """Runs the program of `config`; returns the verdict dict."""
    workdir = os.getcwd()
    set_limits(config["limits"])
    network = isolate_network()
    with open(config["program"], encoding="utf-8") as f:
        source = f.read()
    try:
        code = compile(source, config["program"], "exec")
    except (SyntaxError, ValueError) as e:
        return {"status": "syntax", "message": f"{type(e).__name__}: {e}"[:500], "network": network}
    violations = []
    hook, state = make_guard(workdir, violations)
    sys.addaudithook(hook)
    verdict = {"status": "passed", "nonce": config["nonce"]}
    try:
        exec(code, {"__name__": "__main__", "__file__": config["program"], "__builtins__": builtins})
    except BaseException as e:
        status, message = classify(e)
        verdict = {"status": status, "message": message}
    state["on"] = False
    if violations:
        verdict = {"status": "blocked", "message": "; ".join(violations)[:500]}
    verdict["network"] = network
    return verdict


def main():
    """Entry point: `launcher.py RESULT_FD` with the config JSON on stdin."""
    result_fd = int(sys.argv[1])
    config = json.loads(sys.stdin.readline())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.set_inheritable(result_fd, False)
    try:
        verdict = run(config, result_fd)
    except BaseException as e:
        verdict = dict(zip(_STATUS_KEYS, classify(e), strict=True))
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os.write(result_fd, json.dumps(verdict).encode()[:4096])
    os._exit(0)


if __name__ == "__main__":
    main()
