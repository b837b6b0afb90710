"""Chat templates render as transformers renders them: sandboxed Jinja2 with its helpers."""

from __future__ import annotations

import pytest

from engine.tokenizer.chat import TemplateError, render_chat_template

MESSAGES = [{"role": "user", "content": "héllo"}]


def test_trim_and_lstrip_blocks():
    template = "{% for m in messages %}\n    {% if m %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    assert render_chat_template(template, MESSAGES) == "héllo"


def test_raise_exception():
    template = ("{% if messages[0]['role'] != 'system' %}"
                "{{ raise_exception('need a system') }}{% endif %}")
    with pytest.raises(TemplateError, match="need a system"):
        render_chat_template(template, MESSAGES)
    assert issubclass(TemplateError, ValueError)


def test_tojson_keeps_unicode_and_order():
    out = render_chat_template("{{ messages[0] | tojson }}", MESSAGES)
    assert out == '{"role": "user", "content": "héllo"}'


def test_loop_controls_and_generation_block():
    template = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                "{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
                "{% if add_generation_prompt %}>{% endif %}")
    two = MESSAGES + [{"role": "user", "content": "x"}]
    assert render_chat_template(template, two) == "héllo>"
    assert render_chat_template(template, two, add_generation_prompt=False) == "héllo"


def test_variables_and_sandbox():
    assert render_chat_template("{{ bos_token }}!", [], bos_token="<s>") == "<s>!"
    with pytest.raises(ValueError):
        render_chat_template("{{ messages.__class__.__mro__ }}", [])
    with pytest.raises(ValueError):
        render_chat_template("{% for %}", [])
    with pytest.raises(ValueError):  # the immutable sandbox: no mutating the conversation
        render_chat_template("{{ messages.append(1) }}", [])
