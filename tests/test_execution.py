"""The code sandbox (`cllm.execution`): pass@1 by running tests, and what a model's code must not
do to the evaluation: hang it, crash it, fake a pass, or touch the machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cllm.execution import (
    CodeProblem,
    SandboxLimits,
    check_completion,
    check_completions,
    execute_program,
    pass_at_1,
    truncate_completion,
)

ADD = CodeProblem(
    task_id="toy/add",
    prompt='def add(a: int, b: int) -> int:\n    """Return a plus b.\n    >>> add(1, 2)\n    3\n    """\n',
    test="def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
    entry_point="add",
)
QUICK = SandboxLimits(timeout_seconds=2.0, cpu_seconds=3)
SLACK = 3.0  # seconds past the timeout a failure may take on a busy 2-core machine


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie left for init to reap is not running
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" in status.read_text()


def test_a_right_completion_passes_and_a_wrong_one_fails():
    right = check_completion(ADD, "    return a + b\n")
    assert right.passed and right.status == "passed" and right.returncode == 0
    wrong = check_completion(ADD, "    return a - b\n")
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.stderr


def test_completions_are_cut_at_humaneval_stop_sequences():
    body = "    return a + b\n"
    for tail in ("\ndef other():\n    pass", "\nclass X:\n    pass", "\nif __name__ == '__main__':\n    add(1, 2)",
                 "\nprint(add(1, 2))", "\n# a comment"):
        assert truncate_completion(body.rstrip("\n") + tail) == body.rstrip("\n")
    assert truncate_completion(body) == body
    indented = "    x = 1\n    # an indented comment stays\n"
    assert truncate_completion(indented) == indented
    # a helper written after the body is cut off, so the body alone is tested
    assert check_completion(ADD, "    return a + b\ndef add(a, b):\n    return 0\n").passed
    assert not check_completion(ADD, "    return a + b\ndef add(a, b):\n    return 0\n", truncate=False).passed


@pytest.mark.parametrize("body, status", [
    ("    while True:\n        pass\n", "timeout"),
    ("    import os\n    os._exit(0)\n", "exited early"),  # exit status 0 before the asserts: no sentinel
    ("    raise SystemExit\n", "exited early"),
    ("    raise SystemExit(0)\n", "exited early"),
    ("    exit(0)\n", "failed"),
    ("    quit()\n", "failed"),
    ("    import ctypes\n    ctypes.string_at(0)\n", "killed by signal SIGSEGV"),
    ("    return a +\n", "failed"),  # a syntax error
    ("    print('x' * 100_000_000)\n    return a + b\n", "failed"),  # over the file-size limit
    ("    x = bytearray(4 << 30)\n    return a + b\n", "failed"),  # over the memory limit
    ("    import os\n    while True:\n        os.fork()\n", "failed"),
    ("    import posix\n    while True:\n        posix.fork()\n", "failed"),
])
def test_untrusted_code_fails_within_its_timeout(body, status):
    started = time.monotonic()
    result = check_completion(ADD, body, QUICK)
    assert not result.passed
    assert result.status == status, (result.status, result.stderr[-500:])
    assert time.monotonic() - started < QUICK.timeout_seconds + SLACK


def test_a_cpu_time_limit_below_the_timeout_kills_the_loop():
    result = check_completion(ADD, "    while True:\n        pass\n", SandboxLimits(timeout_seconds=10, cpu_seconds=1))
    assert result.status == "killed by signal SIGXCPU" and result.seconds < 10


def test_the_output_is_captured_and_capped():
    result = check_completion(ADD, "    print('y' * 100_000)\n    return a + b\n", SandboxLimits(max_output_bytes=1000))
    assert result.passed and result.stdout == "y" * 1000
    flood = check_completion(ADD, "    print('x' * 100_000_000)\n    return a + b\n")
    assert "File too large" in flood.stderr and len(flood.stdout) <= SandboxLimits().max_output_bytes


def test_nothing_forked_outlives_the_run(tmp_path):
    """Children forked behind the guard's back (ctypes calls libc's fork) die with the process group,
    after a timeout and after a normal exit alike."""
    pids = tmp_path / "pids.txt"
    for ending in ("    while True:\n        pass\n", "    return a + b\n"):
        body = ("    import ctypes, time\n    libc = ctypes.CDLL(None)\n"
                "    for _ in range(3):\n"
                "        if libc.fork() == 0:\n"
                "            time.sleep(60)\n"
                f"    open({str(pids)!r}, 'a').write(str(libc.getpid()) + '\\n')\n" + ending)
        check_completion(ADD, body, QUICK)
        written = [int(line) for line in pids.read_text().split()]
        assert written
        time.sleep(0.2)
        assert all(_gone(pid) for pid in written), written
        pids.unlink()


def test_the_child_has_its_limits_an_empty_environment_and_its_own_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("CLLM_SECRET_TOKEN", "do-not-leak")
    monkeypatch.chdir(tmp_path)
    program = (
        "import os, sys\n"
        "assert 'CLLM_SECRET_TOKEN' not in os.environ and 'HOME' not in os.environ, dict(os.environ)\n"
        "assert sys.flags.isolated == 1\n"
        "limits = open('/proc/self/limits').read()\n"
        "print(limits)\n"
        "open('written.txt', 'w').write('x')\n"
    )
    result = execute_program(program, SandboxLimits(max_processes=77, cpu_seconds=3, max_file_bytes=12345,
                                                    max_output_bytes=100_000))
    assert result.passed, result.stderr
    limits = {line[:26].strip(): line[26:].split() for line in result.stdout.splitlines()[1:] if line.strip()}
    assert limits["Max processes"][:2] == ["77", "77"]
    assert limits["Max cpu time"][:2] == ["3", "4"]
    assert limits["Max file size"][:2] == ["12345", "12345"]
    assert limits["Max address space"][0] == str(SandboxLimits().memory_bytes)
    assert limits["Max core file size"][0] == "0"
    assert not (tmp_path / "written.txt").exists()  # the child wrote into its own temporary directory


DESTRUCTIVE = {
    "os.remove": "import os\nos.remove({path!r})",
    "os.unlink": "import os\nos.unlink({path!r})",
    "os.rename": "import os\nos.rename({path!r}, {path!r} + '.moved')",
    "os.replace": "import os\nos.replace({path!r}, {path!r} + '.moved')",
    "os.truncate": "import os\nos.truncate({path!r}, 0)",
    "os.chmod": "import os\nos.chmod({path!r}, 0)",
    "os.rmdir": "import os\nos.rmdir({folder!r})",
    "os.removedirs": "import os\nos.removedirs({folder!r})",
    "shutil.rmtree": "import shutil\nshutil.rmtree({folder!r})",
    "shutil.move": "import shutil\nshutil.move({path!r}, {path!r} + '.moved')",
    "os.system": "import os\nos.system('rm -f ' + {path!r})",
    "os.popen": "import os\nos.popen('rm -f ' + {path!r}).read()",
    "os.execv": "import os\nos.execv('/bin/rm', ['rm', '-f', {path!r}])",
    "os.posix_spawn": "import os\nos.posix_spawn('/bin/rm', ['rm', '-f', {path!r}], {{}})",
    "subprocess.Popen": "import subprocess\nsubprocess.Popen(['rm', '-f', {path!r}]).wait()",
    "subprocess.run": "import subprocess\nsubprocess.run(['rm', '-f', {path!r}])",
    "subprocess.check_output": "import subprocess\nsubprocess.check_output(['rm', '-f', {path!r}])",
    "posix.unlink": "import posix\nposix.unlink({path!r})",
}


@pytest.mark.parametrize("name", sorted(DESTRUCTIVE))
def test_destructive_calls_are_blocked(name, tmp_path):
    folder = tmp_path / "outside-the-sandbox"
    folder.mkdir()
    path = folder / "precious.txt"
    path.write_text("keep me")
    mode = path.stat().st_mode
    result = execute_program(DESTRUCTIVE[name].format(path=str(path), folder=str(folder)) + "\n")
    assert not result.passed
    assert "is disabled in the sandbox" in result.stderr, result.stderr[-500:]
    assert path.read_text() == "keep me" and path.stat().st_mode == mode
    assert not Path(f"{path}.moved").exists()


def test_os_kill_is_blocked():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for call in ("os.kill({pid}, 9)", "os.killpg({pid}, 9)"):
            result = execute_program(f"import os\n{call.format(pid=victim.pid)}\n")
            assert not result.passed and "is disabled in the sandbox" in result.stderr
        assert victim.poll() is None  # still running
    finally:
        victim.kill()
        victim.wait()


def test_many_samples_run_in_parallel_and_identical_programs_run_once():
    problems = [ADD] * 6
    completions = ["    return a + b\n", "    return a - b\n", "    while True:\n        pass\n"] * 2
    started = time.monotonic()
    results = check_completions(problems, completions, QUICK, workers=2)
    elapsed = time.monotonic() - started
    assert [r.passed for r in results] == [True, False, False] * 2
    assert results[0] is results[3] and results[2] is results[5]  # deduplicated
    assert results[2].status == "timeout"
    assert elapsed < 2 * QUICK.timeout_seconds + SLACK  # one timeout, not two
    assert pass_at_1(results) == pytest.approx(2 / 6)
    assert pass_at_1([]) == 0.0
    with pytest.raises(ValueError, match="problems"):
        check_completions([ADD], [])
