"""What the `fastserve` console script shows, against a real inference server process: tables at the
terminal's width (COLUMNS, a real pseudo-terminal, a pipe) that fold long columns and never cut the
others, `--wide`, the serving settings of `models list`, help that states the server's real defaults,
and error lines that name the flags of `train submit`."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from fastserve.cli import flagged_line
from fastserve.cli.train import TRAIN_SUBMIT_FLAGS
from fastserve.client.errors import ClientError
from fastserve.client.specs import fill, options
from fastserve.services.inference.batcher import BatchingSettings
from fastserve.services.inference.sampling_params import SamplingParams
from fastserve.services.preprocessing.servicer import DEFAULT_MAX_LENGTH
from fastserve.training.v1 import training_pb2
from tests.test_client import MINILM

FASTSERVE = Path(sys.executable).with_name("fastserve")
MINILM_URI = "builtin://all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def fastserve(gpt_server, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update(FASTSERVE_HOME=str(tmp_path_factory.mktemp("cli-home")), FASTSERVE_INFERENCE_PORT=str(gpt_server.port))

    def run(*args: str, columns: int | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([str(FASTSERVE), *args], capture_output=True, text=True, timeout=120,
                                env={**env, **({"COLUMNS": str(columns)} if columns else {})})
        assert result.returncode == 0, result.stderr
        return result
    run.env = env
    return run


def _rows(text: str) -> tuple[str, list[str]]:
    """The header line and the lines after the rule under it."""
    lines = text.rstrip("\n").splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"})
    return lines[rule - 1], lines[rule + 1:]


def _column(header: str, lines: list[str], name: str) -> str:
    """A column's text, its folded pieces joined (the last column: from its header's offset on)."""
    start = header.index(name)
    return "".join(line[start:].strip() for line in lines)


def test_a_table_folds_long_columns_and_never_cuts_the_others(fastserve):
    header, lines = _rows(fastserve("models", "list", columns=60).stdout)
    assert header.split() == ["name", "version", "state", "task", "backend", "scheduling", "batch", "delay",
                              "queue", "uri"]
    row = lines[0].split()
    assert row[:9] == [MINILM, "1", "ready", "embedding", "pytorch", "-", "32", "10", "ms"]
    # The URI did not fit: it folded onto more lines, whole when its pieces are put together.
    assert len(lines) > 1 and MINILM_URI not in lines[0]
    assert _column(header, lines, "uri") == MINILM_URI

    for wide in (fastserve("models", "list", "--wide", columns=60), fastserve("--wide", "models", "list", columns=60),
                 fastserve("models", "list")):  # --wide, before or after the command, and a pipe without COLUMNS
        header, lines = _rows(wide.stdout)
        assert len(lines) == 1 and lines[0].split()[-1] == MINILM_URI


def test_a_table_takes_the_terminals_width(fastserve):
    """Under a real pseudo-terminal (no COLUMNS): at 120 columns the URI fits, whole on its row; at 100
    it folds; at 40 the columns kept whole make the table wider than the terminal, and nothing is cut."""
    def on_terminal(columns: int) -> list[str]:
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        # The terminal is stdin too, as in a shell (rich reads the size of the first standard stream that
        # is one); not TERM=dumb, for which rich assumes 80 columns.
        proc = subprocess.Popen([str(FASTSERVE), "models", "list"], stdin=follower, stdout=follower,
                                stderr=subprocess.PIPE, env={**fastserve.env, "TERM": "xterm"})
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the follower side closed: the process is done writing
                break
            if not chunk:
                break
            out += chunk
        os.close(leader)
        assert proc.wait(60) == 0, proc.stderr.read()
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.decode()).replace("\r", "")
        return text.splitlines()

    lines = on_terminal(120)
    assert max(len(line.rstrip()) for line in lines) <= 120
    assert any(line.split()[:1] == [MINILM] and line.split()[-1] == MINILM_URI for line in lines)
    folded = on_terminal(100)
    assert not any(MINILM_URI in line for line in folded) and _column(*_rows("\n".join(folded)), "uri") == MINILM_URI
    narrow = on_terminal(40)
    assert any(line.split()[:9] == [MINILM, "1", "ready", "embedding", "pytorch", "-", "32", "10", "ms"]
               for line in narrow)


def test_models_list_shows_the_serving_settings(fastserve):
    fastserve("models", "load", "gpt", "--uri", "artifact://models/tiny-gpt/1", "--scheduling", "mlfq",
              "--max-batch-size", "4")
    try:
        header, lines = _rows(fastserve("models", "list").stdout)
        assert "generation" in header.split()
        rows = {line.split()[0]: line for line in lines}
        gpt = rows["gpt"].split()
        assert gpt[2:9] == ["ready", "generation", "pytorch", "mlfq", "4", "-", str(256)]
        generation = rows["gpt"][header.index("generation"):header.index("uri")].strip()
        assert re.fullmatch(r"kv slots 8, context \d+, prefill 256, mlfq levels 6, quantum 8, starvation 5000 ms, "
                            r"oldest places 1", generation), generation
        assert rows[MINILM][header.index("generation"):header.index("uri")].strip() == "-"
    finally:
        fastserve("models", "unload", "gpt")


def _help_line(fastserve, command: list[str], option: str) -> str:
    text = fastserve(*command, "--help", columns=400).stdout
    return next(line for line in text.splitlines() if re.search(rf"\s{re.escape(option)}\s", line))


@pytest.mark.parametrize("command, option, default", [
    (["generate"], "--max-new-tokens", SamplingParams.max_new_tokens),
    (["generate"], "--temperature", SamplingParams.temperature),
    (["generate"], "--top-k", SamplingParams.top_k),
    (["generate"], "--top-p", SamplingParams.top_p),
    (["generate"], "--repetition-penalty", SamplingParams.repetition_penalty),
    (["models", "load"], "--max-batch-size", BatchingSettings.max_batch_size),
    (["preprocess", "dataset"], "--max-length", DEFAULT_MAX_LENGTH),
    (["preprocess", "dataset"], "--validation", 0.05),
    (["preprocess", "tokenizer"], "--min-frequency", 2),
])
def test_help_states_the_servers_defaults(fastserve, command, option, default):
    """Each option shows the default the server applies: as typer's `[default: X]` when the CLI sends
    it, or in words ("default: the server's (X") when it leaves the field unset."""
    line = _help_line(fastserve, command, option)
    shown = re.search(r"\[default: ([^\]]+)\]", line)
    if shown:
        assert float(shown.group(1)) == default, line
    else:
        assert f"default: the server's ({default}" in line, line


def _error(make) -> ClientError:
    with pytest.raises(ClientError) as info:
        make()
    return info.value


@pytest.mark.parametrize("make, line", [
    (lambda: fill(training_pb2.ArchitectureConfig(), options("layers=2", "model.architecture"), "model.architecture"),
     "INVALID_ARGUMENT: unknown option 'layers'; one of family, num_layers, hidden_size, num_heads, "
     "intermediate_size, max_position_embeddings, vocab_size, dropout (option --arch layers=)"),
    (lambda: fill(training_pb2.ArchitectureConfig(), {"num_layers": "two"}, "model.architecture"),
     "INVALID_ARGUMENT: num_layers does not take 'two' (option --arch num_layers=)"),
    (lambda: options("warmup_steps", "hyperparameters"),
     "INVALID_ARGUMENT: expected key=value, got 'warmup_steps' (option --hp)"),
    (lambda: fill(training_pb2.Hyperparameters(), {"lr_schedule": "zigzag"}, "hyperparameters"),
     "INVALID_ARGUMENT: lr_schedule must be one of linear, cosine, constant, got 'zigzag' (option --hp lr_schedule=)"),
    (lambda: fill(training_pb2.Hyperparameters(), {"batch_size": "x"}, "hyperparameters"),
     "INVALID_ARGUMENT: batch_size does not take 'x' (option --batch-size)"),
])
def test_train_submit_errors_name_its_flags(make, line):
    """The errors `train submit` meets while it builds its request (the client's own, worded as the
    server's), named by the command's flags."""
    assert flagged_line(_error(make), TRAIN_SUBMIT_FLAGS) == line
