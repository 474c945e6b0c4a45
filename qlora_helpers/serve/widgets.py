"""In the notebook: a prompt in the run's template, greedy text streamed as it comes, a chat box.

Imports: transformers and ipywidgets are imported where used (heavy, and ipywidgets only in Jupyter)."""

from __future__ import annotations

import html
import threading
from collections.abc import Iterator

from ..prompts import encode_prompt, render_instruction
from ..runs import Run


def prompt_for(run: Run, tokenizer, instruction: str) -> str:
    """An instruction in the run's template (what the adapter was trained on), as text; its token ids
    are `prompts.encode_text(run, tokenizer, text)`."""
    return render_instruction(run, tokenizer, instruction)


def stream_text(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> Iterator[str]:
    """Greedy generation from a prompt's token ids (`prompt_for`), yielding text pieces as they come
    (transformers' TextIteratorStreamer, generate running in a thread)."""
    import torch
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    worker = threading.Thread(target=model.generate, daemon=True, kwargs=dict(
        **enc, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id))
    worker.start()
    yield from streamer
    worker.join()


def chat_box(run: Run, model, tokenizer, max_new_tokens: int = 128):
    """An ipywidgets chat: type, press Enter or Send, watch the answer stream in."""
    import ipywidgets as widgets

    log = widgets.HTML(value="<i>Ask something.</i>")
    # continuous_update=False: the box sends its whole text on Enter (or when it loses focus) as one
    # value change. Text.on_submit raced the per-keystroke updates: in JupyterLab a message typed
    # and sent at once arrived as its first letter (found by tests/test_browser.py).
    entry = widgets.Text(placeholder="Your message", continuous_update=False, layout=widgets.Layout(width="70%"))
    send = widgets.Button(description="Send", button_style="primary")
    turns: list[str] = []

    def on_send(_=None):
        question, entry.value = entry.value.strip(), ""
        if not question:
            return
        turns.append(f"<b>you</b>: {html.escape(question)}")
        answer = ""
        for piece in stream_text(model, tokenizer, encode_prompt(run, tokenizer, question), max_new_tokens):
            answer += piece
            log.value = "<br>".join(turns + [f"<b>model</b>: {html.escape(answer)}"])
        turns.append(f"<b>model</b>: {html.escape(answer)}")

    send.on_click(on_send)  # a click first blurs the box, whose text then arrives as a value change
    entry.observe(lambda change: on_send() if change["new"].strip() else None, names="value")
    return widgets.VBox([log, widgets.HBox([entry, send])])


