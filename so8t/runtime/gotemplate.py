"""A small renderer for the subset of Go ``text/template`` that Ollama TEMPLATEs here use.

Ollama renders a Modelfile's TEMPLATE with Go's ``text/template``
(https://pkg.go.dev/text/template). Ollama itself cannot run here, so
:mod:`so8t.runtime.ollama` renders its templates with this module and compares
the text with the model's Jinja chat template. Supported (enough for the
templates in :data:`so8t.runtime.ollama.FAMILIES`, and an error for anything
else):

* text and ``{{ pipeline }}`` actions with the trim markers ``{{-`` and ``-}}``
  (they remove all white space, newlines included, on that side);
* ``{{ if P }}`` / ``{{ else if P }}`` / ``{{ else }}`` / ``{{ end }}``;
* ``{{ range P }}``, ``{{ range $v := P }}``, ``{{ range $i, $v := P }}`` (with ``{{ else }}``);
* operands: ``.``, ``.Field.Field``, ``$``, ``$var.Field``, ``"strings"``,
  integers, ``( command ).Field``;
* functions: ``eq`` (any of several), ``ne``, ``and``, ``or``, ``not``, ``index``, ``len``.

Truth follows Go: false, 0, nil and empty strings, lists and maps are false.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from so8t.errors import So8tError


class GoTemplateError(So8tError, ValueError):
    """The template uses something outside the supported subset, or is malformed."""


_ACTION = re.compile(r"\{\{(- )?(.*?)( -)?\}\}", re.DOTALL)
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*")
      | (?P<num>-?\d+)
      | (?P<lp>\()
      | (?P<rp>\))(?P<rpfields>(?:\.[A-Za-z_]\w*)*)
      | (?P<var>\$[A-Za-z_]\w*|\$)(?P<varfields>(?:\.[A-Za-z_]\w*)*)
      | (?P<field>(?:\.[A-Za-z_]\w*)+|\.)
      | (?P<ident>[A-Za-z_]\w*)
    )""",
    re.VERBOSE,
)


# ---------------------------------------------------------------- expressions


def _truth(v) -> bool:
    return v not in (None, False, 0, "") and not (isinstance(v, (list, tuple, dict)) and len(v) == 0)


def _get(obj, name: str):
    if isinstance(obj, dict):
        if name not in obj:
            raise GoTemplateError(f"no field {name!r} in {sorted(obj)}")
        return obj[name]
    try:
        return getattr(obj, name)
    except AttributeError:
        raise GoTemplateError(f"no field {name!r} on {type(obj).__name__}") from None


def _fields(value, chain: str):
    for name in [n for n in chain.split(".") if n]:
        value = _get(value, name)
    return value


def _index(coll, *keys):
    for k in keys:
        try:
            coll = coll[k]
        except (IndexError, KeyError, TypeError):
            raise GoTemplateError(f"index {k!r} out of range") from None
    return coll


FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "index": _index,
    "len": len,
}


@dataclass
class _Expr:
    kind: str  # str | num | var | field | call | group
    value: object = None
    fields: str = ""
    args: list = field(default_factory=list)


def _parse_command(text: str) -> _Expr:
    tokens = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise GoTemplateError(f"cannot parse {text[pos:]!r} in {{{{ {text} }}}}")
        tokens.append(m)
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    expr, rest = _command(tokens, 0, text)
    if rest != len(tokens):
        raise GoTemplateError(f"unexpected ')' in {{{{ {text} }}}}")
    return expr


def _command(tokens, i: int, src: str) -> tuple[_Expr, int]:
    operands = []
    while i < len(tokens) and tokens[i].group("rp") is None:
        op, i = _operand(tokens, i, src)
        operands.append(op)
    if not operands:
        raise GoTemplateError(f"empty command in {{{{ {src} }}}}")
    head = operands[0]
    if head.kind == "ident":
        if head.value not in FUNCS and head.value not in ("and", "or"):
            raise GoTemplateError(f"unsupported function {head.value!r}")
        return _Expr("call", head.value, args=operands[1:]), i
    if len(operands) > 1:
        raise GoTemplateError(f"{{{{ {src} }}}}: only a function can take arguments")
    return head, i


def _operand(tokens, i: int, src: str) -> tuple[_Expr, int]:
    m = tokens[i]
    if m.group("str") is not None:
        return _Expr("str", json.loads(m.group("str"))), i + 1
    if m.group("num") is not None:
        return _Expr("num", int(m.group("num"))), i + 1
    if m.group("var") is not None:
        return _Expr("var", m.group("var"), m.group("varfields")), i + 1
    if m.group("field") is not None:
        return _Expr("field", None, "" if m.group("field") == "." else m.group("field")), i + 1
    if m.group("ident") is not None:
        return _Expr("ident", m.group("ident")), i + 1
    if m.group("lp") is not None:
        inner, j = _command(tokens, i + 1, src)
        if j >= len(tokens) or tokens[j].group("rp") is None:
            raise GoTemplateError(f"missing ')' in {{{{ {src} }}}}")
        return _Expr("group", inner, tokens[j].group("rpfields")), j + 1
    raise GoTemplateError(f"unexpected ')' in {{{{ {src} }}}}")


def _eval(e: _Expr, dot, scope: dict):
    if e.kind in ("str", "num"):
        return e.value
    if e.kind == "var":
        if e.value not in scope:
            raise GoTemplateError(f"undefined variable {e.value}")
        return _fields(scope[e.value], e.fields)
    if e.kind == "field":
        return _fields(dot, e.fields)
    if e.kind == "group":
        return _fields(_eval(e.value, dot, scope), e.fields)
    if e.kind == "call":
        if e.value == "and":  # Go's and/or evaluate lazily and return an operand
            v = True
            for a in e.args:
                v = _eval(a, dot, scope)
                if not _truth(v):
                    return v
            return v
        if e.value == "or":
            v = False
            for a in e.args:
                v = _eval(a, dot, scope)
                if _truth(v):
                    return v
            return v
        return FUNCS[e.value](*[_eval(a, dot, scope) for a in e.args])
    raise GoTemplateError(f"cannot evaluate {e.kind}")


# ---------------------------------------------------------------- statements


@dataclass
class _Node:
    kind: str  # text | out | if | range
    text: str = ""
    expr: _Expr | None = None
    branches: list = field(default_factory=list)  # if: [(expr or None, body)]
    body: list = field(default_factory=list)
    else_body: list = field(default_factory=list)
    vars: tuple[str, ...] = ()


def _lex(template: str) -> list[tuple[str, str]]:
    items: list[list[str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        items.append(["text", text])
        items.append(["action", m.group(2).strip()])
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = template[pos:]
    items.append(["text", tail.lstrip() if trim_next else tail])
    if "{{" in "".join(t for k, t in items if k == "text"):
        raise GoTemplateError("unterminated or malformed action ('{{' without a matching '}}')")
    return [(k, t) for k, t in items if not (k == "text" and t == "")]


_RANGE = re.compile(r"^range\s+(?:(\$\w+)\s*(?:,\s*(\$\w+)\s*)?:=\s*)?(.+)$", re.DOTALL)


def _parse(items: list[tuple[str, str]], i: int, stops: tuple[str, ...]) -> tuple[list[_Node], int]:
    body: list[_Node] = []
    while i < len(items):
        kind, text = items[i]
        if kind == "text":
            body.append(_Node("text", text))
            i += 1
            continue
        word = text.split(None, 1)[0] if text else ""
        if word in ("end", "else") and word in stops:
            return body, i
        if word in ("end", "else"):
            raise GoTemplateError(f"unexpected {{{{ {text} }}}}")
        if word == "if":
            node = _Node("if")
            cond = _parse_command(text[2:])
            while True:
                block, i = _parse(items, i + 1, ("end", "else"))
                node.branches.append((cond, block))
                action = items[i][1] if i < len(items) else ""
                if action.startswith("else if "):
                    cond = _parse_command(action[len("else if ") :])
                    continue
                if action == "else":
                    node.else_body, i = _parse(items, i + 1, ("end",))
                    action = items[i][1] if i < len(items) else ""
                if action != "end":
                    raise GoTemplateError("{{ if }} without {{ end }}")
                i += 1
                break
            body.append(node)
            continue
        if word == "range":
            m = _RANGE.match(text)
            if not m:
                raise GoTemplateError(f"cannot parse {{{{ {text} }}}}")
            names = tuple(v for v in m.group(1, 2) if v)
            node = _Node("range", expr=_parse_command(m.group(3)), vars=names)
            node.body, i = _parse(items, i + 1, ("end", "else"))
            if i < len(items) and items[i][1] == "else":
                node.else_body, i = _parse(items, i + 1, ("end",))
            if i >= len(items) or items[i][1] != "end":
                raise GoTemplateError("{{ range }} without {{ end }}")
            body.append(node)
            i += 1
            continue
        if text.startswith("/*"):
            i += 1
            continue
        body.append(_Node("out", expr=_parse_command(text)))
        i += 1
    if stops:
        raise GoTemplateError(f"missing {{{{ {stops[0]} }}}}")
    return body, i


def _show(v) -> str:
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _run(nodes: list[_Node], dot, scope: dict, out: list[str]) -> None:
    for n in nodes:
        if n.kind == "text":
            out.append(n.text)
        elif n.kind == "out":
            out.append(_show(_eval(n.expr, dot, scope)))
        elif n.kind == "if":
            for cond, block in n.branches:
                if _truth(_eval(cond, dot, scope)):
                    _run(block, dot, scope, out)
                    break
            else:
                _run(n.else_body, dot, scope, out)
        elif n.kind == "range":
            seq = _eval(n.expr, dot, scope)
            items = list(seq.items()) if isinstance(seq, dict) else list(enumerate(seq or []))
            if not items:
                _run(n.else_body, dot, scope, out)
            for key, item in items:
                inner = dict(scope)
                if len(n.vars) == 1:
                    inner[n.vars[0]] = item
                elif len(n.vars) == 2:
                    inner[n.vars[0]], inner[n.vars[1]] = key, item
                _run(n.body, item, inner, out)


def render(template: str, data) -> str:
    """Render a Go ``text/template`` (the subset above) with ``data`` as ``.`` and ``$``.

    Raises:
        GoTemplateError: unsupported or malformed template, missing field or variable.
    """
    nodes, _ = _parse(_lex(template), 0, ())
    out: list[str] = []
    _run(nodes, data, {"$": data}, out)
    return "".join(out)
