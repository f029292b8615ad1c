"""Conversation templates: render a conversation once into role-tagged text segments.

A template turns messages into an ordered list of `Segment`s whose `supervised` flag says whether the tokens of
that text are trained on. The label builder tokenizes the segments (one tokenizer call per sample) and derives
label spans from them, so labels can never drift from the rendering. The same template also emits the Jinja chat
template stored with the tokenizer, so inference prompts equal training prompts (upstream's demo drifted).

Adding a template is one small class registered in `TEMPLATES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlcd_vl.errors import UsageError
from mlcd_vl.vocab import IMAGE_PLACEHOLDER

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool
    role: str


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str  # may contain <image> placeholders


class TemplateError(UsageError, ValueError):
    """A conversation the template cannot render; the message says why."""


def normalize_messages(turns: list[dict]) -> list[Message]:
    """LLaVA `{"from", "value"}` or OpenAI-style `{"role", "content"}` turns -> Messages; unknown roles raise."""
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise TemplateError(f"turn {index} is not an object")
        raw_role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise TemplateError(f"turn {index} has unknown role {raw_role!r}")
        if not isinstance(content, str):
            raise TemplateError(f"turn {index} has no text content")
        messages.append(Message(role, content))
    return messages


class Template:
    name: str = ""
    #: tokens the model emits to end an answer (decoded stop strings for generation)
    stop_strings: tuple[str, ...] = ()
    #: `label_mode="upstream"`: tokens upstream un-masks everywhere, system and user turns included (its
    #: `preprocess_qwen`); the label builder looks their ids up in the tokenizer (upstream hard-coded 198 for the
    #: newline)
    upstream_unmasked_tokens: tuple[str, ...] = ()

    def segments(self, messages: list[Message], *, add_generation_prompt: bool = False) -> list[Segment]:
        raise NotImplementedError

    def render(self, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
        return "".join(s.text for s in self.segments(messages, add_generation_prompt=add_generation_prompt))

    def jinja(self) -> str:
        raise NotImplementedError


class PlainTemplate(Template):
    """Stage 1 (upstream `preprocess_plain`): `<image>` + caption + newline; the human text is dropped, no EOS."""

    name = "plain"
    stop_strings = ("\n",)

    def segments(self, messages: list[Message], *, add_generation_prompt: bool = False) -> list[Segment]:
        turns = [m for m in messages if m.role != "system"]
        if add_generation_prompt:
            return [Segment(IMAGE_PLACEHOLDER, False, "user")]
        if len(turns) != 2 or turns[0].role != "user" or turns[1].role != "assistant":
            raise TemplateError("the plain template needs exactly one user turn followed by one assistant turn")
        if IMAGE_PLACEHOLDER not in turns[0].content:
            raise TemplateError("the plain template needs an <image> in the user turn")
        return [Segment(IMAGE_PLACEHOLDER, False, "user"), Segment(turns[1].content + "\n", True, "assistant")]

    def jinja(self) -> str:
        return ("{%- for message in messages -%}{%- if message['role'] == 'user' -%}<image>"
                "{%- elif message['role'] == 'assistant' -%}{{ message['content'] if message['content'] is string "
                "else message['content'][0]['text'] }}\n{%- endif -%}{%- endfor -%}")


class ChatMLTemplate(Template):
    """Upstream `qwen_1_5` (also `qwen_2`): ChatML with the generic Qwen system prompt.

    Supervised by default: each assistant turn's content and its `<|im_end|>` (the model must learn to stop). The
    assistant header and the newline after `<|im_end|>` are context, not targets.
    """

    name = "qwen_1_5"
    system_prompt = "You are a helpful assistant."
    stop_strings = ("<|im_end|>",)
    upstream_unmasked_tokens = ("\n", "<|im_start|>", "<|im_end|>")

    def segments(self, messages: list[Message], *, add_generation_prompt: bool = False) -> list[Segment]:
        if messages and messages[0].role == "system":
            system, messages = messages[0].content, messages[1:]
        else:
            system = self.system_prompt
        out = [Segment(f"<|im_start|>system\n{system}<|im_end|>\n", False, "system")]
        for message in messages:
            if message.role == "system":
                raise TemplateError("a system message is only allowed first")
            out.append(Segment(f"<|im_start|>{message.role}\n", False, message.role))
            if message.role == "assistant":
                out.append(Segment(message.content + "<|im_end|>", True, "assistant"))
                out.append(Segment("\n", False, "assistant"))
            else:
                out.append(Segment(message.content + "<|im_end|>\n", False, message.role))
        if add_generation_prompt:
            out.append(Segment("<|im_start|>assistant\n", False, "assistant"))
        return out

    def jinja(self) -> str:
        system = self.system_prompt
        return (
            "{%- for message in messages -%}"
            "{%- if loop.first and message['role'] != 'system' -%}"
            "{{ '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}"
            "{%- endif -%}"
            "{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{%- if message['content'] is string -%}{{ message['content'] }}"
            "{%- else -%}{%- for part in message['content'] -%}"
            "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
            "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
            "{%- endfor -%}{%- endif -%}"
            "{{ '<|im_end|>\\n' }}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
        )


TEMPLATES: dict[str, Template] = {t.name: t for t in (PlainTemplate(), ChatMLTemplate())}
TEMPLATES["qwen_2"] = TEMPLATES["qwen_1_5"]


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None
