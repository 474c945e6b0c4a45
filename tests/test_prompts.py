"""One prompt, one list of token ids, wherever it goes: training, held-out loss, generation, the
server, the export gate, the benchmarks' prompts and the notebook's widgets all encode it by the
rule of qlora_helpers/prompts.py. Checked on a tokenizer that ADDS a BOS and, for the chat
template, a template that writes its own BOS (as LLaMA-2's does): the case where adding special
tokens to chat text gives a second BOS that training never saw."""

import asyncio
import json
from types import SimpleNamespace

import pytest
import torch

from qlora_helpers import prompts
from qlora_helpers.config import DataConfig, SourceConfig
from qlora_helpers.prompts import adds_special_tokens, encode_prompt, render_instruction

INSTRUCTION = "Give three tips for staying healthy."  # the gate's first probe
# A LLaMA-2-like chat template: it writes the BOS itself, in the text.
BOS_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}[assistant] {% endif %}")
TEMPLATES = ["alpaca", "chat"]


@pytest.fixture(scope="module")
def bos_tok(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir, add_bos_token=True)
    tok.chat_template = BOS_CHAT_TEMPLATE
    tok.pad_token = tok.pad_token or tok.eos_token
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # this tokenizer adds a BOS
    return tok


@pytest.fixture(scope="module")
def model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def _run(template):
    """What the stages read the template from: run.cfg.data.template."""
    return SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(template=template)))


def _first_input(model, call) -> list[int]:
    """The token ids of the first row the model's first forward pass saw while `call` ran (padding,
    masked out by the attention mask, left out)."""
    seen = []

    def hook(_, args, kwargs):
        if not seen:
            ids, mask = kwargs["input_ids"][0], kwargs.get("attention_mask")
            seen.append(ids[mask[0].bool()].tolist() if mask is not None and mask.dim() == 2 else ids.tolist())

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return seen[0]


def _train_examples(tmp_path, tok, template) -> list[dict]:
    """Stage 03's own path (read, validate, render, tokenize) on one alpaca row and one chat row that
    both hold INSTRUCTION."""
    (tmp_path / "al.json").write_text(json.dumps([{"instruction": INSTRUCTION, "input": "", "output": "Sleep."}]))
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": INSTRUCTION},
                                                                  {"role": "assistant", "content": "Walk."}]}))
    from qlora_helpers.prepared import build_examples

    cfg = DataConfig(data_dir=str(tmp_path), sources=[SourceConfig(path="al.json"), SourceConfig(path="chat.jsonl")],
                     template=template)
    examples, _ = build_examples(cfg, tok, 256)
    assert len(examples) == 2
    return examples


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_path_encodes_the_prompt_into_the_same_ids(tmp_path, bos_tok, model, template):
    from qlora_helpers.generation import generate
    from qlora_helpers.scoring import heldout_loss
    from qlora_helpers.serve import api, checks, gate, widgets

    tok, run = bos_tok, _run(template)
    expected = encode_prompt(template, tok, INSTRUCTION)
    assert expected[0] == tok.bos_token_id and expected.count(tok.bos_token_id) == 1  # one BOS, as trained
    text = render_instruction(template, tok, INSTRUCTION)
    examples = _train_examples(tmp_path, tok, template)
    paths = {f"train ({e['source']} row)": e["input_ids"][:e["prompt_len"]] for e in examples}
    pairs = [(e["prompt"], e["response"]) for e in examples]  # what 02/04/05 score: the eval split's pairs
    paths["held-out loss"] = _first_input(model, lambda: heldout_loss(model, tok, pairs[:1], 1, 256, template=run))
    paths["held-out loss"] = paths["held-out loss"][:len(expected)]
    ids = prompts.encode_prompts(run, tok, [INSTRUCTION])  # what 02 and 05 hand to generate
    paths["generation"] = _first_input(model, lambda: generate(model, tok, ids, 1))
    paths["generation (rouge: the eval split's prompt text)"] = prompts.encode_text(run, tok, examples[0]["prompt"])
    state = SimpleNamespace(tokenizer=tok, template=template, vocab=len(tok))
    paths["api /v1/completions"] = asyncio.run(api.prompt_ids(state, text))[0][0]
    chat_text = prompts.render_conversation([{"role": "user", "content": INSTRUCTION}], template, tok)
    paths["api /v1/chat/completions"] = asyncio.run(api.prompt_ids(state, chat_text))[0][0]
    text_and_ids = gate.probe_prompts(run, tok)[0]
    paths["gate probe"] = text_and_ids[1]
    reference = lambda: gate.reference_continuations(model, tok, [paths["gate probe"]], 1)  # noqa: E731
    paths["gate reference"] = _first_input(model, reference)
    paths["widgets chat box"] = encode_prompt(run, tok, INSTRUCTION)
    paths["06 stream_text"] = prompts.encode_text(run, tok, widgets.prompt_for(run, tok, INSTRUCTION))
    assert text_and_ids[0] == text and examples[0]["prompt"] == text
    assert {name: ids for name, ids in paths.items() if ids != expected} == {}
    bench = checks.bench_prompts(tok, template, 1)[0]
    assert bench == encode_prompt(template, tok, "Explain the water cycle in three sentences.")


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("special", [True, False])
def test_another_special_token_choice_gives_other_ids(bos_tok, template, special):
    """The check above is not vacuous: on this tokenizer, a path that chose the other
    add_special_tokens would see other ids (alpaca: no BOS; chat: two)."""
    text = render_instruction(template, bos_tok, INSTRUCTION)
    ids = bos_tok(text, add_special_tokens=special)["input_ids"]
    assert (ids == encode_prompt(template, bos_tok, INSTRUCTION)) == (special == adds_special_tokens(template))
    if special != adds_special_tokens(template):
        assert ids.count(bos_tok.bos_token_id) == (2 if template == "chat" else 0)


def test_template_is_chosen_in_one_place():
    assert prompts.template_of("chat") == prompts.template_of(_run("chat")) == "chat"
    assert prompts.template_of(DataConfig(template="alpaca")) == "alpaca"
    with pytest.raises(prompts.ConfigError, match="valid: alpaca, chat"):
        prompts.template_of("llama")


def test_template_stops():
    tok = SimpleNamespace(eos_token="<|im_end|>")
    assert prompts.template_stops("chat", tok) == ()
    assert prompts.template_stops("alpaca", tok) == ("### Instruction:", "### Input:", "### Response:")
    prompt = prompts.format_alpaca({"instruction": "Add.", "input": "2 and 3", "output": ""})[0]
    assert all(stop in prompt for stop in prompts.ALPACA_SECTIONS)  # the markers are the template's own
