"""Prompts: how an instruction, a conversation or a data record becomes text, and text becomes token ids.

The one owner of that rule for every stage: training (03 tokenizes what 04 trains on), held-out loss
(02, 04, 05), generation (02, 05), the server (`serve/api.py`), the export gate, the benchmarks'
prompts, the notebook's chat box and the Ollama Modelfile all call these functions, so a prompt
means the same token ids wherever it goes.

Two templates (`data.template`): `alpaca`, the Stanford Alpaca text around the instruction, and
`chat`, the tokenizer's own chat template. The special-token rule (`adds_special_tokens`):
chat-template text already holds every special token the model was trained with (a LLaMA-2 template
writes its own `<s>`), so the tokenizer adds none to it; alpaca text, and plain text sent in that
template, gets the tokenizer's own (BOS, where the tokenizer adds one). Adding them to chat text
would give a second BOS that training never saw.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import ConfigError, DataError

TEMPLATES = ("alpaca", "chat")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# The section markers of the template: a model that runs on past its answer starts the next section.
ALPACA_SECTIONS = ("### Instruction:", "### Input:", "### Response:")


class NoChatTemplate(ConfigError):
    """data.template is `chat` but the tokenizer has no chat template."""


class BadConversation(DataError):
    """A chat conversation the template cannot render (a data row is dropped for it, a chat request
    gets a 400)."""


def template_of(run_or_template: Any) -> str:
    """The template name (`alpaca` or `chat`) of a run (its data.template), a run config, a data config
    or a name; the one place that decides which template a prompt is rendered with."""
    value = getattr(run_or_template, "cfg", run_or_template)  # a run: its config
    if not isinstance(value, str) and not hasattr(value, "template"):
        value = value.data  # a run config: its data section
    value = value if isinstance(value, str) else value.template
    if value not in TEMPLATES:
        raise ConfigError(f"Unknown prompt template {value!r}; valid: {', '.join(TEMPLATES)} (data.template).")
    return value


def native_template(tokenizer) -> str:
    """The template a base model is best asked in: its chat template when its tokenizer has one."""
    return "chat" if tokenizer.chat_template else "alpaca"


def require_chat_template(tokenizer) -> None:
    if not tokenizer.chat_template:
        raise NoChatTemplate("data.template is 'chat' but this tokenizer has no chat template, so it cannot "
                             "render prompts; set data.template=alpaca or use a model whose tokenizer has one.")


def adds_special_tokens(run_or_template: Any) -> bool:
    """The special-token rule (module doc): the tokenizer adds its special tokens to alpaca text only."""
    return template_of(run_or_template) != "chat"


# --- rendering -----------------------------------------------------------------------------------


def shown_prompt(prompt: str) -> str:
    """A rendered prompt as a table shows it to a reader: an Alpaca prompt from its instruction on,
    without the fixed preamble before it and the response marker after it; other text unchanged."""
    start = prompt.find(ALPACA_SECTIONS[0])
    if start < 0:
        return prompt
    return prompt[start:].removesuffix("\n").removesuffix(ALPACA_SECTIONS[-1]).strip()


def format_alpaca(record: dict[str, Any]) -> tuple[str, str]:
    """(prompt, response) in the Stanford Alpaca template, with or without the input section."""
    fill = {"instruction": record["instruction"], "input": record.get("input") or ""}
    template = ALPACA_PROMPT_WITH_INPUT if fill["input"].strip() else ALPACA_PROMPT
    return template.format(**fill), record["output"]


def _chat_text(tokenizer, messages: list[dict[str, str]]) -> str:
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_conversation(messages: list[dict[str, str]], template: str, tokenizer) -> str:
    """The prompt for a conversation whose next turn is the assistant's: what 03 trains on for
    multi-turn data and what the server sends the model for a chat request (one rule for both).

    `chat`: the tokenizer's chat template. `alpaca`: system messages are the preamble (the Input
    section), the earlier turns follow as context in the Input ("User: ..." / "Assistant: ..."
    lines), the last user turn is the Instruction. BadConversation when there is no user turn, or
    an assistant turn follows the last one."""
    if template_of(template) == "chat":
        return _chat_text(tokenizer, messages)
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        raise BadConversation("the conversation has no user message (the alpaca template needs one as the instruction)")
    if last != len(messages) - 1 and any(m["role"] == "assistant" for m in messages[last + 1:]):
        raise BadConversation("an assistant turn follows the last user message; end the conversation with a user turn")
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    earlier = "\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                        for m in messages[:last] if m["role"] != "system")
    context = "\n\n".join(part for part in (system, earlier and f"Conversation so far:\n{earlier}") if part)
    return format_alpaca({"instruction": messages[last]["content"], "input": context, "output": ""})[0]


def render_instruction(run_or_template: Any, tokenizer, instruction: str) -> str:
    """One instruction as the model should see it: a conversation of one user turn."""
    return render_conversation([{"role": "user", "content": instruction}], template_of(run_or_template), tokenizer)


def render(record: dict[str, Any], template: str, tokenizer) -> tuple[str, str]:
    """(prompt, response) text of a validated record (`formats.normalize_row`: kind alpaca, raw or chat).
    The response is the last assistant turn; earlier turns are context (`render_conversation`)."""
    kind = record["kind"]
    if kind == "raw":
        return record["prompt"], record["completion"]
    if kind == "chat":
        msgs = record["messages"]
        return render_conversation(msgs[:-1], template, tokenizer), msgs[-1]["content"]
    if template_of(template) == "alpaca":
        return format_alpaca(record)
    user = record["instruction"] + (f"\n\n{record['input']}" if record["input"].strip() else "")
    return _chat_text(tokenizer, [{"role": "user", "content": user}]), record["output"]


# --- encoding -------------------------------------------------------------------------------------


def encode_text(run_or_template: Any, tokenizer, text: str) -> list[int]:
    """Token ids of prompt text already rendered in the template (or sent as it is to the server)."""
    return tokenizer(text, add_special_tokens=adds_special_tokens(run_or_template))["input_ids"]


def encode_prompt(run_or_template: Any, tokenizer, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of an instruction (str) or a conversation (messages) rendered in the template."""
    template = template_of(run_or_template)
    text = (render_instruction(template, tokenizer, prompt) if isinstance(prompt, str)
            else render_conversation(prompt, template, tokenizer))
    return encode_text(template, tokenizer, text)


def encode_prompts(run_or_template: Any, tokenizer, prompts: Iterable[str | list[dict[str, str]]]) -> list[list[int]]:
    return [encode_prompt(run_or_template, tokenizer, p) for p in prompts]


def encode_pairs(run_or_template: Any, tokenizer, pairs: list[tuple[str, str]],
                 train_on_prompt: bool = False) -> list[dict[str, Any]]:
    """Rendered (prompt, response) pairs as training/scoring examples, one fast-tokenizer call per side:
    input_ids = prompt ids (the rule above) + response ids + EOS; labels -100 on the prompt unless
    train_on_prompt; prompt_len = how many ids the prompt has."""
    if not pairs:
        return []
    # Callers check lengths themselves (drop, truncate or skip, counted): silence the tokenizer's warning.
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=adds_special_tokens(run_or_template))["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for p, r in zip(prompts, responses):
        r = r + [eos]
        out.append({"input_ids": p + r, "labels": (p if train_on_prompt else [-100] * len(p)) + r,
                    "prompt_len": len(p)})
    return out


def template_stops(template: str, tokenizer) -> tuple[str, ...]:
    """Strings that end an answer because the template uses them to open a section: the model learnt
    to write its response and stop, and what follows a marker is a new example it imagines. `alpaca`:
    its section headings; `chat`: none beyond the tokenizer's EOS (the chat template's end of turn),
    which ends a row already (the server's EOS rule; the Modelfile adds it, gguf.stop_tokens)."""
    return ALPACA_SECTIONS if template_of(template) == "alpaca" else ()
