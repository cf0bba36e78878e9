"""Chat templates rendered under a budget: a template comes with a checkpoint, from anyone, and is code.

Jinja's ``ImmutableSandboxedEnvironment`` (as ``transformers`` uses) already keeps a template from Python's
internals and from the file system (no ``include``). It does not bound the work: two nested ``range(100000)``
loops run for hours, ``"x" * 10**10`` allocates ten gigabytes. ``ChatTemplate`` renders with the environment
transformers builds (the same globals, filters and extensions, so a template renders to the same text) plus a
budget that every step of the template draws from:

* every loop iteration, function, method and filter call, and binary operator counts one step; the render is
  refused once it has run ``seconds`` (checked at each step) or ``steps`` steps;
* an operator, call or filter whose result would exceed the output size (``"x" * n``, ``s ~ s``,
  ``"%09999999d" % 1``, ``center(n)``) is refused before it is computed;
* the rendered text is refused past ``max_chars``; deep macro recursion is refused, not a ``RecursionError``.

Everything wrong, in the template's syntax, in what it raises, or past its budget, is a ``TemplateError`` (a
``ValueError``) naming the template's source and the reason: the commands report it as a ``config error:``.
"""

from __future__ import annotations

import functools
import json
import re
import time
from datetime import datetime

MAX_SECONDS = 2.0
MAX_STEPS = 5_000_000
MAX_CHARS = 4 << 20
_BIG_NUMBER = re.compile(r"\d{7,}")   # a width or precision in a format string that could allocate megabytes


class TemplateError(ValueError):
    """A chat template that does not render: its syntax, an error it raises, or a render past its budget."""


class _OverBudget(Exception):
    """Raised inside a render; reported as a ``TemplateError`` (its own type, so a template cannot catch it)."""


class ChatTemplate:
    """A chat template compiled once, rendered under a budget (see the module's docstring)."""

    def __init__(self, source: str, where: str, specials: dict | None = None, *, seconds: float = MAX_SECONDS,
                 steps: int = MAX_STEPS, max_chars: int = MAX_CHARS):
        import jinja2

        if not isinstance(source, str):
            raise TemplateError(f"{where}: the chat template is {type(source).__name__}, not a string")
        self.where, self.specials = where, dict(specials or {})
        self.seconds, self.steps, self.max_chars = seconds, steps, max_chars
        self._env = _environment(self)
        try:
            self._template = self._env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{where}: the chat template does not parse (line {e.lineno}: {e.message})") from None
        except RecursionError:
            raise TemplateError(f"{where}: the chat template is nested too deeply to parse") from None
        self._deadline, self._count = 0.0, 0

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **extra) -> str:
        """The transcript ``messages`` as text (``add_generation_prompt``: with the assistant's header after it)."""
        import jinja2

        self._deadline, self._count = time.monotonic() + self.seconds, 0
        context = {**self.specials, "tools": None, "documents": None, **extra,
                   "messages": json.loads(json.dumps(messages)), "add_generation_prompt": add_generation_prompt}
        out, size = [], 0
        try:
            for chunk in self._template.generate(**context):
                size += len(chunk)
                if size > self.max_chars:
                    raise _OverBudget(f"its output passed {self.max_chars:,} characters")
                self.tick()
                out.append(chunk)
        except _OverBudget as e:
            raise TemplateError(f"{self.where}: the chat template was stopped: {e}") from None
        except RecursionError:
            raise TemplateError(f"{self.where}: the chat template recursed too deeply") from None
        except jinja2.TemplateError as e:   # raise_exception(...), an undefined call, a sandbox refusal
            raise TemplateError(f"{self.where}: the chat template failed: {type(e).__name__}: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
                MemoryError) as e:   # a template's own bug on these messages
            raise TemplateError(f"{self.where}: the chat template failed: {type(e).__name__}: {e}") from None
        return "".join(out)

    # ------------------------------------------------------------------ the budget, drawn by the environment

    def tick(self) -> None:
        self._count += 1
        if self._count > self.steps:
            raise _OverBudget(f"it took more than {self.steps:,} steps")
        if time.monotonic() > self._deadline:
            raise _OverBudget(f"it ran longer than {self.seconds:g} s")

    def check_size(self, n: int, what: str) -> None:
        if n > self.max_chars:
            raise _OverBudget(f"{what} would hold {n:,} items (more than {self.max_chars:,})")


def _size(x) -> int | None:
    return len(x) if isinstance(x, (str, list, tuple, dict)) else None


def _environment(budget: ChatTemplate):
    """transformers' chat-template environment (``_cached_compile_jinja_template``: trim_blocks, lstrip_blocks,
    loop controls, ``{% generation %}``, ``raise_exception``, ``strftime_now``, its ``tojson``, guarded
    ``namespace`` and ``dict``), with every loop, call, filter and operator drawing on ``budget``."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: its body, as rendered (the assistant mask it marks for
        transformers is not used here: masks come from message spans)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%", "//"})

        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            # every loop draws a step per item, and every `~` concatenation is sized before it is built
            for loop in tree.find_all(nodes.For):
                loop.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [loop.iter], [], None, None,
                                       lineno=loop.lineno)
            for concat in list(tree.find_all(nodes.Concat)):
                concat.nodes = [nodes.Call(nodes.EnvironmentAttribute("bounded_concat"), list(concat.nodes), [],
                                           None, None, lineno=concat.lineno)]
            return tree

        def bounded_iter(self, iterable):
            for item in iterable:
                budget.tick()
                yield item

        def bounded_concat(self, *parts):
            texts = [str(p) for p in parts]
            budget.check_size(sum(map(len, texts)), "a ~ concatenation")
            return "".join(texts)

        def call_binop(self, context, operator, left, right):
            budget.tick()
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if _size(seq) is not None and isinstance(n, int):
                        budget.check_size(_size(seq) * max(n, 0), "a repetition")
            elif operator == "+" and _size(left) is not None and _size(right) is not None:
                budget.check_size(_size(left) + _size(right), "a concatenation")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                budget.check_size(right * abs(left).bit_length() // 8, "a power's digits")
            elif operator == "%" and isinstance(left, str) and _BIG_NUMBER.search(left):
                raise _OverBudget("a %-format with a width of millions")
            return super().call_binop(context, operator, left, right)

        def getattr(self, obj, attribute):
            budget.tick()
            if isinstance(obj, str) and attribute in ("format", "format_map") and _BIG_NUMBER.search(obj):
                raise _OverBudget("a format string with a width of millions")
            return super().getattr(obj, attribute)

        def call(__self, __context, __obj, *args, **kwargs):   # noqa: N805 (jinja's own signature)
            budget.tick()
            _check_arguments(budget, args, kwargs)
            result = super().call(__context, __obj, *args, **kwargs)
            if (n := _size(result)) is not None:
                budget.check_size(n, "a call's result")
            return result


    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")

    # optimized=False: the optimizer folds constant expressions at compile time, outside every hook below
    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols],
                  optimized=False)
    env.filters["tojson"] = tojson
    # compiled templates call filters directly, not through the environment: each is wrapped to draw on the budget
    env.filters = {name: _bounded_filter(budget, name, f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=TemplateNamespace,
                       dict=TemplateDict())
    return env


def _bounded_filter(budget: ChatTemplate, name: str, f):
    skip = 2 if hasattr(f, "jinja_pass_arg") else 1   # the context/environment, if passed, and the value filtered

    @functools.wraps(f)   # keeps jinja_pass_arg: jinja passes the context as it would to ``f``
    def bounded(*args, **kwargs):
        budget.tick()
        _check_arguments(budget, args[skip:], kwargs)
        result = f(*args, **kwargs)
        if (n := _size(result)) is not None:
            budget.check_size(n, f"the {name} filter's result")
        return result

    return bounded


def _check_arguments(budget: ChatTemplate, args, kwargs) -> None:
    """Refuse, before the call, an argument that asks for megabytes: a width (``center(10**9)``, ``ljust``,
    ``indent``, ``wordwrap``). (A format string's own widths are refused when its ``format`` is looked up.)"""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and value > budget.max_chars:
            raise _OverBudget(f"an argument of {value:,} (more than {budget.max_chars:,})")
