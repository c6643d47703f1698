"""The tests' own guard against the race between picking a free port and a child binding it: a child
that finds its port taken is started again on another, and any other failure to start is not retried."""

from __future__ import annotations

import socket

import grpc
import pytest

from fastserve.client.channels import health_status
from tests.support import processes


class Picks:
    """`free_port`'s stand-in: the ports given first, then free ones; it keeps each port it handed out."""

    def __init__(self, *first: int) -> None:
        self.first, self.picked, self.free_port = list(first), [], processes.free_port

    def __call__(self) -> int:
        self.picked.append(self.first.pop(0) if self.first else self.free_port())
        return self.picked[-1]


def test_a_server_whose_port_was_taken_starts_again_on_another(tmp_path, monkeypatch):
    with socket.socket() as holder:  # another process's listener, bound between the pick and the child's bind
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        picks = Picks(taken)
        monkeypatch.setattr(processes, "free_port", picks)
        proc = processes.start_inference(tmp_path / "home", tmp_path / "inference.log",
                                         FASTSERVE_INFERENCE_MODELS="none")
    try:
        assert picks.picked == [taken, proc.port] and proc.port != taken
        with grpc.insecure_channel(proc.target) as channel:
            assert health_status(channel, timeout=5.0) == "SERVING"
    finally:
        proc.stop()


def test_a_server_that_fails_for_another_reason_is_not_started_again(tmp_path, monkeypatch):
    picks = Picks()
    monkeypatch.setattr(processes, "free_port", picks)
    with pytest.raises(RuntimeError) as failed:
        processes.start_inference(tmp_path / "home", tmp_path / "inference.log", FASTSERVE_INFERENCE_MODELS="none",
                                  FASTSERVE_INFERENCE_MAX_MODELS="many")
    assert type(failed.value) is RuntimeError and len(picks.picked) == 1
    assert "did not start" in str(failed.value) and "FASTSERVE_INFERENCE_MAX_MODELS" in str(failed.value)
