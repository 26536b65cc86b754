"""The chat templates of composites: Vicuna-style turns whose content items may be text or any modality the composite
has (`default`), and the paper's `vicuna_v1` (its system line, no space after an answer's end-of-sequence token)."""

from typing import Any


# The content-item types that stand for each modality kind in chat messages.
_CONTENT_TYPES_BY_KIND = {
    "image": ("image",),
    "video": ("video",),
    "audio": ("audio",),
    "point": ("point", "point_cloud"),
}


# The paper's conversation (LLaVA's `vicuna_v1`): this system line, then "USER: q ASSISTANT: a</s>" turns joined by a
# space after the question and nothing after the answer's `</s>`.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions."
)
CHAT_TEMPLATE_NAMES = ("default", "vicuna_v1")


def named_chat_template(name: str, modalities: dict[str, dict[str, Any]]) -> str:
    """The chat template a recipe names: `default` ([`default_chat_template`]) or `vicuna_v1` (the paper's: the same
    turns, its system line when the messages bring none, and no space after an answer's end-of-sequence token)."""
    if name == "default":
        return default_chat_template(modalities)
    if name == "vicuna_v1":
        return default_chat_template(modalities, default_system=VICUNA_V1_SYSTEM, space_after_answer=False)
    raise ValueError(
        f"Unknown chat template name {name!r}; use one of {list(CHAT_TEMPLATE_NAMES)} or a Jinja template."
    )


def default_chat_template(
    modalities: dict[str, dict[str, Any]], default_system: str | None = None, space_after_answer: bool = True
) -> str:
    """A Vicuna-style chat template whose content items may be text or any modality the composite has.

    `modalities` maps each modality name to (at least) its `kind` and `placeholder`, as
    [`CompositeMLLMConfig.processor_modalities`] gives them. A content item of a kind (`image`, `video`, `audio`,
    `point` or `point_cloud`) becomes the placeholder of the modality it names in its `"modality"` key, or of the first
    modality of that kind when it names none, followed by a newline; naming a modality that is not of the item's kind
    raises an error. `default_system` is written first when the messages hold no system message;
    `space_after_answer=False` joins an answer's end-of-sequence token directly to the next turn, as LLaVA's
    `vicuna_v1` does.
    """
    by_kind: dict[str, list[str]] = {}
    for name, entry in modalities.items():
        by_kind.setdefault(entry["kind"], []).append(name)
    branches = ""
    for kind, names in by_kind.items():
        # Placeholders and names are emitted as Jinja string literals, never as template text, so that a token such
        # as `{{x}}` stays literal and no whitespace control strips part of it.
        choices = "".join(
            "{%- elif item['modality'] == " + repr(name) + " %}{{ " + repr(modalities[name]["placeholder"]) + " }}"
            for name in names
        )
        unknown = repr(f", which is not one of the {kind} modalities {names}.")
        branches += (
            "{%- elif item['type'] in " + repr(list(_CONTENT_TYPES_BY_KIND[kind])) + " %}"
            "{%- if item['modality'] is not defined or item['modality'] is none %}"
            "{{ " + repr(modalities[names[0]]["placeholder"]) + " }}" + choices + "{%- else %}"
            "{{ raise_exception('A content item of type ' ~ item['type'] ~ ' names modality ' ~ item['modality'] ~ "
            + unknown
            + ") }}"
            "{%- endif %}{{ '\\n' }}"
        )
    system = (
        "{%- if messages[0]['role'] != 'system' %}{{ " + repr(default_system) + " }}{{ ' ' }}{%- endif %}"
        if default_system
        else ""
    )
    after_answer = "{{ eos_token }}{{ ' ' }}" if space_after_answer else "{{ eos_token }}"
    return (
        system + "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}"
        "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}{{ ' ' }}"
        "{%- else %}"
        "{{ message['role'] | upper }}{{ ': ' }}"
        "{%- if message['content'] is string %}{{ message['content'] }}"
        "{%- else %}{%- for item in message['content'] %}"
        "{%- if item['type'] == 'text' %}{{ item['text'] }}" + branches + "{%- endif %}"
        "{%- endfor %}{%- endif %}"
        "{%- if message['role'] == 'assistant' %}" + after_answer + "{%- else %}{{ ' ' }}{%- endif %}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}ASSISTANT:{%- endif %}"
    )
