"""The README's commands as a new user runs them, each in a fresh shell: `make up` and `make status`
from "Running the stack", then the CLI section's block top to bottom, then `make down`. The commands run
as written, with two kinds of change only: a small plan (fewer steps and documents, each substitution
checked to apply, so that the README cannot drift from what is tested) and `<job id>` filled in with a
job in the state the line needs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastserve.runtime.config import SERVICES
from tests.conftest import private_env
from tests.support.processes import free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ACTIVATE = "source .venv/bin/activate"
MAKE_ERROR = re.compile(r"make(\[\d+\])?: \*\*\*")  # make's own error line, nested or not

# What the small plan changes: (as written, as run).
SMALL_PLAN = [
    ("--vocab-size 8000", "--vocab-size 1000 --max-documents 2000"),
    ("--max-length 128 --output stdlib-clm", "--max-length 128 --max-documents 2000 --output stdlib-clm"),
    ("--max-steps 500", "--max-steps 6"),
    ("--max-documents 1200", "--max-documents 200"),
    ("--epochs 2", "--max-steps 4"),
    ("resume <job id> --max-steps 1000", "resume <job id> --max-steps 40"),
]
# A job for the cancel and resume lines: long enough to be running when the cancel comes, with checkpoints.
LONG_JOB = ("train submit --dataset artifact://datasets/stdlib-clm/latest "
            "--tokenizer artifact://tokenizers/bpe8k/latest "
            "--output long-gpt --arch family=gpt2,num_layers=1,hidden_size=32,num_heads=2 --max-steps 100000 "
            "--hp checkpoint_interval_steps=5,log_interval_steps=1")


def block_after(heading: str) -> list[str]:
    """The commands of the first fenced block after `heading`: continuations joined, blank and
    comment-only lines dropped (the shell drops trailing comments itself)."""
    text = README.read_text()
    section = text[text.index(heading):]
    block = section.split("```\n", 2)[1]
    commands, current = [], ""
    for line in block.splitlines():
        if current:
            line = current + " " + line.strip()
        if line.rstrip().endswith("\\"):
            current = line.rstrip()[:-1].rstrip()
            continue
        current = ""
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
    return commands


def small_plan(commands: list[str]) -> list[str]:
    script = "\n".join(commands)
    for written, run in SMALL_PLAN:
        assert script.count(written) == 1, f"the README no longer has {written!r}: update the small plan"
        script = script.replace(written, run)
    return script.split("\n")


@pytest.fixture
def shell(tmp_path, redis_server):
    """Runs one line in a new bash in the checkout, as a user's shell would, on a private stack."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("the README's commands name .venv: run the tests through `make test`")
    env = {"HOME": str(tmp_path), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "COLUMNS": "200",
           **private_env(tmp_path / "home", redis_server.url),
           **{f"FASTSERVE_{s.upper()}_PORT": str(free_port()) for s in SERVICES}}

    def run(line: str, timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=timeout)
        print(f"$ {line}\n{result.stdout}{result.stderr}")
        return result
    yield run
    run("make down", timeout=120)


def _job(shell, job_id: str) -> dict:
    result = shell(f"{ACTIVATE} && fastserve --json train get {job_id}")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _wait_for(shell, job_id: str, done, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = _job(shell, job_id)
        if done(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} never got there: {job}"
        time.sleep(1)


def test_the_readme_cli_section_runs_as_written(shell):
    stack = [line.split(" #")[0].strip() for line in block_after("## Running the stack")]
    assert stack == ["make up", "make status", "make down"], stack
    for line in stack[:2]:
        result = shell(line)
        assert result.returncode == 0 and not MAKE_ERROR.search(result.stderr), result.stdout + result.stderr
        if line == "make up":  # this shell has no `fastserve` on PATH: up says how to get it
            assert f"`{ACTIVATE}` puts it on PATH" in result.stdout

    commands = small_plan(block_after("## CLI"))
    # The first line puts `fastserve` on PATH; a fresh shell has none.
    assert commands[0].split(" #")[0].strip() == ACTIVATE
    assert shell("fastserve --help").returncode == 127
    ids: dict[str, str] = {}
    for line in commands[1:]:
        if "<job id>" in line:
            line = line.replace("<job id>", _job_for(shell, line, ids))
        result = shell(f"{ACTIVATE} && {line}")
        assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"
        _check(line, result.stdout, ids)
        if " train submit " in f" {line} ":
            ids["trained"] = _newest_job(shell)

    _the_python_client_section_runs(shell)

    result = shell(stack[-1])
    assert result.returncode == 0, result.stderr
    stopped = shell("make status")
    assert stopped.returncode == 0 and not MAKE_ERROR.search(stopped.stdout + stopped.stderr)
    assert "the stack is not running" in stopped.stdout


def _the_python_client_section_runs(shell) -> None:
    """The client snippet, on the stack the CLI block left (its datasets are there), a few steps only:
    it trains, serves and streams, prints each progress line once, and catches the error it shows."""
    text = README.read_text()
    snippet = text[text.index("## Python client"):].split("```python\n", 1)[1].split("```", 1)[0]
    assert snippet.count('{"max_steps": 100}') == 1, "update the small plan of the Python snippet"
    snippet = snippet.replace('{"max_steps": 100}', '{"max_steps": 6, "log_interval_steps": 2}')
    result = shell(f"{ACTIVATE} && python - <<'EOF'\n{snippet}EOF")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    progress = [line for line in lines if re.match(r"^\d+% \S", line)]
    assert progress and progress[-1].startswith("100%")
    assert all(a != b for a, b in zip(progress, progress[1:], strict=False)), "a progress line is printed twice"
    assert lines[-1].startswith("StatusCode.INVALID_ARGUMENT") and "['texts']" in lines[-1]


def _newest_job(shell) -> str:
    listed = shell(f"{ACTIVATE} && fastserve --json train list --limit 1")
    return json.loads(listed.stdout)["jobs"][0]["job_id"]


def _job_for(shell, line: str, ids: dict[str, str]) -> str:
    """The job a `<job id>` line needs: a finished one to watch, a running one to cancel, the
    cancelled one (once CANCELLED, with its checkpoint) to resume."""
    if " watch " in line:
        return ids["trained"]
    if " cancel " in line:
        submitted = shell(f"{ACTIVATE} && fastserve {LONG_JOB}")
        assert submitted.returncode == 0, submitted.stderr
        ids["long"] = submitted.stdout.strip().splitlines()[-1]
        _wait_for(shell, ids["long"], lambda job: job["state"] == "JOB_STATE_RUNNING" and job["progress"] > 0)
        return ids["long"]
    if " resume " in line:
        _wait_for(shell, ids["long"], lambda job: job["state"] == "JOB_STATE_CANCELLED")
        return ids["long"]
    raise AssertionError(f"no job for {line!r}")


def _check(line: str, out: str, ids: dict[str, str]) -> None:
    """What each kind of line must print beyond a zero exit."""
    if line.startswith("fastserve models list"):
        assert "all-MiniLM-L6-v2" in out
    elif line.startswith("fastserve embed"):
        vector = json.loads(out.strip())
        assert len(vector) == 384 and all(isinstance(v, float) for v in vector)
    elif line.startswith("fastserve tokenize"):
        assert re.search(r"\d", out) and "return" in out.lower()
    elif line.startswith("fastserve generate"):
        assert out.strip(), "the completion is empty or only whitespace"
    elif line.startswith("fastserve classify"):
        assert re.search(r"\d\.\d{3}", out)  # label scores
    elif line.startswith("fastserve models load"):
        assert " ready " in out
    elif line.startswith("fastserve optimize submit"):
        assert "latency" in out.lower() and "size" in out.lower()
    elif line.startswith("fastserve train cancel"):
        assert "CANCEL" in out.upper()
    elif line.startswith("fastserve train resume"):
        assert "SUCCEEDED" in out.upper()
    elif line.startswith("fastserve logs"):
        assert out.strip()
    elif line.startswith("fastserve train list"):
        assert ids["trained"] in out
    elif line.startswith("fastserve artifacts list"):
        assert "artifact://models/stdlib-gpt/1" in out
    elif line.startswith("fastserve artifacts show"):
        assert "artifact://datasets/stdlib-clm/1" in out and "artifact://tokenizers/bpe8k/1" in out
    elif line.startswith("fastserve artifacts alias"):
        assert "production" in out and "artifact://models/stdlib-gpt/1" in out
    elif line.startswith("fastserve models import"):
        assert "artifact://models/my-gpt/1" in out and "GPT2LMHeadModel" in out

