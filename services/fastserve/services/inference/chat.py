"""Chat: a conversation rendered into a prompt by the model's chat template, and the tokens that end a turn.
No gRPC here.

transformers renders and tokenizes (`apply_chat_template`, in its sandboxed jinja2 environment), so a
prompt is exactly what the model was trained on. Control tokens written inside a message's content
(`<|im_end|>` typed by a user) are encoded as plain text: only the template itself can open or close a
turn. The turn ends at the model's EOS tokens (generation_config.json, which the engine stops at for
every request) and at the tokenizer's EOS and the special token the template closes an assistant
message with (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`), which a chat request adds to its stop ids.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastserve.runtime.errors import FailedPrecondition, InvalidArgument, error_gist

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 256
MAX_CONTENT_BYTES = 1 << 20  # all contents together; the boundary caps each string at as much
MAX_TEMPLATE_BYTES = 64 * 1024
TEMPLATE_FIELD = "config.generation.chat_template"
_REPLY = "\ue000fastserve-reply\ue000"  # private-use marks no template alters: what follows it closes a reply
PROBE = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _REPLY}]


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Chat:
    """A conversation to answer: `add_generation_prompt` False continues its final message instead."""

    messages: tuple[Message, ...]
    add_generation_prompt: bool = True

    def check(self) -> Chat:
        """Self, or InvalidArgument naming the field at fault (`messages`, `messages[i].role`)."""
        if not self.messages:
            raise InvalidArgument("a chat needs at least one message", field="messages")
        if len(self.messages) > MAX_MESSAGES:
            raise InvalidArgument(f"at most {MAX_MESSAGES} messages, got {len(self.messages)}", field="messages")
        for i, m in enumerate(self.messages):
            if m.role not in ROLES:
                raise InvalidArgument(f"messages[{i}] has no role (system, user or assistant)",
                                      field=f"messages[{i}].role")
        size = sum(len(m.content.encode("utf-8", "surrogatepass")) for m in self.messages)
        if size > MAX_CONTENT_BYTES:
            raise InvalidArgument(f"the messages' contents total {size} bytes, over {MAX_CONTENT_BYTES}",
                                  field="messages")
        return self


def check_template(template: str) -> None:
    """The bound on a chat template given at LoadModel (whether it parses is known once the tokenizer is)."""
    if len(template.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE_BYTES:
        raise InvalidArgument(f"chat_template is longer than {MAX_TEMPLATE_BYTES} bytes", field=TEMPLATE_FIELD)


class ChatTemplate:
    """A model folder's tokenizer with the chat template it renders with."""

    def __init__(self, tokenizer: Any, template: str, probe: str) -> None:
        """`probe`: the template's rendering of PROBE (empty if it refused it)."""
        self.tokenizer, self.template = tokenizer, template
        # transformers' tokenizer reconfigures its Rust tokenizer around each call: one call at a time.
        self.lock = threading.Lock()
        self.end_of_turn = self._end_of_turn(probe)

    def prompt_ids(self, chat: Chat) -> list[int]:
        """The rendered conversation's token ids; InvalidArgument naming `messages` if the template refuses it."""
        messages = [{"role": m.role, "content": m.content} for m in chat.messages]
        try:
            with self.lock:
                return list(self.tokenizer.apply_chat_template(
                    messages, chat_template=self.template, add_generation_prompt=chat.add_generation_prompt,
                    continue_final_message=not chat.add_generation_prompt, tokenize=True, return_dict=False,
                    sanitize_control_tokens=True))
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception, or an error it trips on the messages
            raise InvalidArgument(f"the chat template refused the messages: {error_gist(exc)}",
                                  field="messages") from None

    def _end_of_turn(self, probe: str) -> tuple[int, ...]:
        """The tokenizer's EOS and the special token right after a reply, where the template puts one."""
        ids = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        after = probe.split(_REPLY, 1)[1] if _REPLY in probe else ""
        special = {i for i, token in self.tokenizer.added_tokens_decoder.items() if token.special}
        ids += [i for i in self.tokenizer.encode(after, add_special_tokens=False)[:1] if i in special]
        return tuple(dict.fromkeys(ids))


def open_chat_template(folder: Path, template: str = "", field: str = "model_uri") -> ChatTemplate | None:
    """The folder's chat template, or `template` (given at LoadModel) in its place; None when there is neither.
    A template that does not parse: INVALID_ARGUMENT naming TEMPLATE_FIELD if it was given, else
    FAILED_PRECONDITION naming `field`."""
    if not template and not _has_template(folder):
        return None
    import jinja2
    from transformers import AutoTokenizer

    given = bool(template)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        template = tokenizer.get_chat_template(template or None)
    except Exception as exc:  # noqa: BLE001 - transformers raises what its parts do on a folder it cannot read
        raise FailedPrecondition(f"the chat template of {folder.name} cannot be read: {error_gist(exc)}",
                                 field=field) from None
    try:
        probe = tokenizer.apply_chat_template(PROBE, chat_template=template, tokenize=False)
    except jinja2.TemplateSyntaxError as exc:
        error = InvalidArgument if given else FailedPrecondition
        raise error(f"the chat template does not parse: {exc.message} (line {exc.lineno})",
                    field=TEMPLATE_FIELD if given else field) from None
    except Exception:  # noqa: BLE001 - a template may refuse this exchange; replies then end at EOS alone
        probe = ""
    return ChatTemplate(tokenizer, template, probe)


def _has_template(folder: Path) -> bool:
    if any((folder / name).exists() for name in ("chat_template.jinja", "chat_template.json",
                                                 "additional_chat_templates")):
        return True
    config = folder / "tokenizer_config.json"
    try:
        return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False  # load_tokenizer reports an unreadable folder; without a readable template there is none
