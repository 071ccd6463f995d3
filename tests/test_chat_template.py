"""`ling_jax.data.chat_template`: a checkpoint's Jinja chat template, its loss mask, and where it is used."""

from __future__ import annotations

import json
import pathlib
import string

import ml_collections
import numpy as np
import pytest
import tokenizers

from ling_jax.data import chat, sft
from ling_jax.data.chat import ChatFormatError, ChatTemplate, Message, Role
from ling_jax.data.chat_template import JinjaChatTemplate, chat_template_for, load_chat_template
from ling_jax.data.settings import default_post_training_data_config
from ling_jax.data.tokenizer import load_tokenizer

S, U, A, T = Role.SYSTEM, Role.USER, Role.ASSISTANT, Role.TOOL
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<role>SYSTEM</role>", "<role>HUMAN</role>", "<role>ASSISTANT</role>",
            "<role>OBSERVATION</role>", "<|role_end|>", "<|im_start|>", "<|im_end|>"]

# Like the Ling 2.0 / Ring templates: a default system prompt, a thinking switch, tools, <|role_end|> ends turns.
LING2 = """{%- if messages[0].role == 'system' -%}
{%- set system = messages[0].content -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system = 'You are Ling.' -%}{%- set loop_messages = messages -%}
{%- endif -%}
<role>SYSTEM</role>{{ system }}
{%- if tools %} Tools: {% for tool in tools %}{{ tool | tojson }}{% endfor %}{% endif %}
 thinking {{ 'on' if enable_thinking is defined and enable_thinking else 'off' }}<|role_end|>
{%- for m in loop_messages -%}
{%- if m.role == 'user' -%}<role>HUMAN</role>{{ m.content }}<|role_end|>
{%- elif m.role == 'assistant' -%}<role>ASSISTANT</role>{{ m.content }}
{%- for c in m.tool_calls or [] %}<call>{{ c.function | tojson }}</call>{% endfor %}<|role_end|>
{%- elif m.role == 'tool' -%}<role>OBSERVATION</role>{{ m.content }}<|role_end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<role>ASSISTANT</role>{%- endif -%}"""

# ChatML with {% generation %} markers; a newline follows every turn (not part of the reply).
CHATML = """{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant
{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}

{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>

{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# bos_token / eos_token from tokenizer_config.json: the eos token ends a reply.
PLAIN = ("{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{% if m.role == 'assistant' %}"
         "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")

CONVERSATION = [Message(U, "Hi"), Message(A, "Hello!"), Message(U, "2+2?"), Message(A, "4")]


def _tokenizer_dir(path: pathlib.Path, *, jinja: str | None = None, config: dict | None = None) -> pathlib.Path:
    """A character-level tokenizer.json with the templates' special tokens, and the template files given."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(SPECIALS + list(string.printable[:95]) + ["\n"])}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.decoder = tokenizers.decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja)
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _masked_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode(np.asarray(ids)[np.asarray(mask)], skip_special_tokens=False)


@pytest.fixture
def ling2(tmp_path):
    d = _tokenizer_dir(tmp_path / "ling2", jinja=LING2)
    return load_tokenizer(d), load_chat_template(d)


def test_ling2_multi_turn_with_the_default_system_and_mask(ling2):
    tok, template = ling2
    assert isinstance(template, JinjaChatTemplate) and template.end_of_turn == "<|role_end|>"
    assert template.render(CONVERSATION) == (
        "<role>SYSTEM</role>You are Ling. thinking off<|role_end|><role>HUMAN</role>Hi<|role_end|>"
        "<role>ASSISTANT</role>Hello!<|role_end|><role>HUMAN</role>2+2?<|role_end|><role>ASSISTANT</role>4<|role_end|>")
    ids, mask = template.encode(tok, CONVERSATION)
    assert tok.decode(ids, skip_special_tokens=False) == template.render(CONVERSATION)
    assert _masked_text(tok, ids, mask) == "Hello!<|role_end|>4<|role_end|>"  # exactly the replies + end of turn
    ids, mask = template.encode(tok, CONVERSATION, loss_from=2)  # DPO: only the response after the prompt
    assert _masked_text(tok, ids, mask) == "4<|role_end|>"
    assert template.check_tokenizer(tok) == SPECIALS.index("<|role_end|>")
    prompt = template.prompt_ids(tok, [Message(S, "Be brief."), Message(U, "Hi")])
    assert tok.decode(prompt, skip_special_tokens=False) == (
        "<role>SYSTEM</role>Be brief. thinking off<|role_end|><role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>")


def test_the_thinking_switch_and_tools_pass_through(tmp_path):
    d = _tokenizer_dir(tmp_path / "ling2", jinja=LING2)
    tok = load_tokenizer(d)
    cfg = ml_collections.ConfigDict({**chat.default_chat_config(), "template_kwargs": '{"enable_thinking": true}'})
    template = chat_template_for(tok, cfg)
    assert "thinking on" in template.render([Message(U, "Hi")], generation_prompt=True)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    template = load_chat_template(d, tools=tools)
    call = {"tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]}
    convo = [Message(U, "1+2?"), Message(A, "", call), Message(T, "3"), Message(A, "It is 3.")]
    text = template.render(convo)
    assert ' Tools: {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}' in text
    ids, mask = template.encode(tok, convo)
    assert _masked_text(tok, ids, mask) == (
        '<call>{"name": "add", "arguments": {"a": 1, "b": 2}}</call><|role_end|>It is 3.<|role_end|>')
    chat.check_turns(convo, "here", ends_with=A)  # a tool result between the call and the answer
    with pytest.raises(ChatFormatError, match="must follow the assistant turn"):
        chat.check_turns([Message(U, "q"), Message(T, "3"), Message(A, "a")], "here", ends_with=A)
    with pytest.raises(ChatFormatError, match="tool result needs the checkpoint's own chat template"):
        ChatTemplate().render(convo)


def test_generation_markers_give_the_mask(tmp_path):
    d = _tokenizer_dir(tmp_path / "chatml", jinja=CHATML)
    tok, template = load_tokenizer(d), load_chat_template(d)
    assert template.has_generation_blocks and template.end_of_turn == "<|im_end|>"
    ids, mask = template.encode(tok, [Message(S, "sys"), *CONVERSATION])
    assert _masked_text(tok, ids, mask) == "Hello!<|im_end|>4<|im_end|>"  # not the newlines after them
    prompt = template.prompt_ids(tok, [Message(U, "Hi")])
    assert tok.decode(prompt, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>\n\n<|im_start|>assistant\n"


def test_bos_and_eos_come_from_tokenizer_config(tmp_path):
    d = _tokenizer_dir(tmp_path / "plain", config={"chat_template": PLAIN, "bos_token": "<s>",
                                                   "eos_token": {"content": "</s>", "special": True}})
    tok = load_tokenizer(d)
    template = chat_template_for(tok)
    assert isinstance(template, JinjaChatTemplate) and template.end_of_turn == "</s>"
    assert tok.bos_id == 2 and tok.eos_id == 3
    ids, mask = template.encode(tok, CONVERSATION[:2], add_bos=True)
    assert tok.decode(ids, skip_special_tokens=False) == "<s>user: Hi\nassistant: Hello!</s>\n"  # one <s>
    assert _masked_text(tok, ids, mask) == " Hello!</s>"
    assert template.prompt_ids(tok, [Message(U, "Hi")], add_bos=True).count(2) == 1


def test_sft_data_uses_the_checkpoint_template_and_falls_back_to_ling(tmp_path):
    d = _tokenizer_dir(tmp_path / "ling2", jinja=LING2)
    tok = load_tokenizer(d)
    data_cfg = default_post_training_data_config()
    assert isinstance(sft.Encoder.from_config(data_cfg, tok, 64).template, JinjaChatTemplate)
    data_cfg.chat.checkpoint_template = False
    with pytest.raises(ChatFormatError, match=r"'<\|endoftext\|>' is not a token"):  # Ling's strings, not here
        sft.Encoder.from_config(data_cfg, tok, 64)
    plain = _tokenizer_dir(tmp_path / "none")
    assert isinstance(chat_template_for(load_tokenizer(plain)), ChatTemplate)  # no template in the directory


def test_templates_that_fail_name_the_file_and_line(tmp_path):
    broken = _tokenizer_dir(tmp_path / "syntax", jinja="{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(ChatFormatError, match=r"chat_template.jinja does not parse, line 2 .*fix the template"):
        load_chat_template(broken)
    raising = "{% for m in messages %}\n{% if m.role == 'system' %}\n{{ raise_exception('no system role') }}\n" \
              "{% endif %}{{ m.content }}{% endfor %}"
    template = load_chat_template(_tokenizer_dir(tmp_path / "raise", jinja=raising))
    with pytest.raises(ChatFormatError, match=r"raise/chat_template.jinja failed to render at line 3 "
                                              r"\(\"\{\{ raise_exception\('no system role'\) \}\}\"\): no system role"):
        template.render([Message(S, "s"), Message(U, "q")])
    # The last reply rendered differently from the same reply in a longer conversation: no mask by prefixes.
    drifting = ("{% for m in messages %}{{ m.role }}:{{ m.content }}{% if loop.last %}!{% endif %}|{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    path = _tokenizer_dir(tmp_path / "drift", jinja=drifting)
    with pytest.raises(ChatFormatError, match=r"drift/chat_template.jinja renders the conversation up to assistant "
                                              r"message 1 differently.*generation"):
        load_chat_template(path).encode(load_tokenizer(path), CONVERSATION)


def test_the_same_text_as_transformers_apply_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")  # the optional `hf` extra
    d = _tokenizer_dir(tmp_path / "ling2", jinja=LING2)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), chat_template=LING2)
    ours = load_chat_template(d, template_kwargs={"enable_thinking": True})
    convo = [m.as_dict() for m in CONVERSATION]
    for prompt in (False, True):
        expected = hf.apply_chat_template(convo, tokenize=False, add_generation_prompt=prompt, enable_thinking=True)
        assert ours.render(CONVERSATION, generation_prompt=prompt) == expected
    d = _tokenizer_dir(tmp_path / "chatml", jinja=CHATML)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), chat_template=CHATML)
    out = hf.apply_chat_template(convo, return_dict=True, return_assistant_tokens_mask=True)
    ids, _ = load_chat_template(d).encode(load_tokenizer(d), CONVERSATION)
    assert out["input_ids"] == ids.tolist()
