"""Chat templates: Jinja2 in a sandbox, with the globals and filters transformers provides."""

from __future__ import annotations

import functools
import json
from datetime import datetime


class TemplateError(ValueError):
    """A chat template called raise_exception(...) or failed to render."""


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson keeps non-ASCII text and key order (Jinja's own escapes HTML).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(Extension):
        """Accepts transformers' {% generation %}...{% endgeneration %} block; renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTracker, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], *,
                         add_generation_prompt: bool = True, **variables) -> str:
    """Render `template` for `messages`.

    Args:
        template: the Jinja2 chat template text.
        messages: the conversation.
        add_generation_prompt: passed to the template.
        **variables: bos_token, eos_token and anything else the template reads.
    Returns:
        The rendered prompt.
    Raises:
        ValueError (TemplateError): the template is invalid or raised an exception.
    """
    from jinja2 import TemplateError as JinjaError

    try:
        return _compile(template).render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         **variables)
    except TemplateError:
        raise
    except JinjaError as e:
        raise TemplateError(f"chat template: {e}") from e
