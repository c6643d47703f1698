"""`fastserve chat`: a conversation with a generative model, one user message a line of stdin, each reply
streamed as it is generated. The whole conversation goes with every turn (the server keeps none)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from fastserve.cli.common import command, state, to_dict
from fastserve.cli.inference import GENERATE_FLAGS, Model
from fastserve.client.inference import sampling_params

EXIT = "/exit"
CHAT_FLAGS = {k: v for k, v in GENERATE_FLAGS.items() if k != "text"}


def register(app: typer.Typer) -> None:
    # Unset options are left to the server, whose defaults the help says (SamplingParams in the proto).
    @command(app, "chat", flags=CHAT_FLAGS,
             help=f"Chat with a model: each line of stdin is a user message, answered as it is generated; the "
                  f"conversation ends at end of input or a line {EXIT}. With --json, each reply is one JSON line.")
    def chat(ctx: typer.Context, model: Model,
             system: Annotated[str, typer.Option(help="A system message that opens the conversation.")] = "",
             max_new_tokens: Annotated[int | None, typer.Option(
                 help="Tokens a reply may take; default: the server's (64, or what the context window has left).")]
             = None,
             temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 for greedy decoding.")] = 0.0,
             top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens; 0: no top-k.")] = 0,
             top_p: Annotated[float | None, typer.Option(
                 help="Nucleus sampling mass, in (0, 1]; default: the server's (1.0, no filtering).")] = None,
             repetition_penalty: Annotated[float | None, typer.Option(
                 help="Above 1 discourages repeated tokens; default: the server's (1.0, no penalty).")] = None,
             seed: Annotated[int | None, typer.Option(help="Makes sampling reproducible; default: random.")] = None,
             stop: Annotated[list[str] | None, typer.Option(help="Stop sequence; repeatable.")] = None) -> int:
        # 0 is what SamplingParams reads as unset (the server's 1.0).
        sampling = sampling_params(max_new_tokens, temperature, top_k, top_p or 0.0, repetition_penalty or 0.0,
                                   seed, stop or ())
        client = state(ctx).client().inference
        history = [{"role": "system", "content": system}] if system else []
        for line in _user_lines():
            history.append({"role": "user", "content": line})
            if state(ctx).json:
                reply = client.chat(model, history, sampling)
                sys.stdout.write(json.dumps(to_dict(reply)) + "\n")
                text = reply.text
            else:
                pieces = []
                for chunk in client.chat_stream(model, history, sampling):
                    if chunk.text:
                        pieces.append(chunk.text)
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
                sys.stdout.write("\n")
                text = "".join(pieces)
            sys.stdout.flush()
            history.append({"role": "assistant", "content": text})
        return 0


def _user_lines():
    """Each non-blank line of stdin, until its end or EXIT; a terminal gets a prompt before each."""
    prompt = sys.stdin.isatty()
    while True:
        if prompt:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == EXIT:
            return
        if line.strip():
            yield line.rstrip("\r\n")
