"""The job spec reference, generated from the spec's pydantic models so that it cannot go stale.

`docs/spec.md` (`prefixbatch spec-reference`) and `prefixbatch validate --explain FIELD` both
come from `spec_sections()`. A field's description is its attribute docstring in the model
(`StrictModel` makes it `FieldInfo.description`); its type, default and allowed values are
read from the annotation, the default and the constraint metadata, never written twice. An
annotation or constraint this module cannot show raises, so a new kind of field fails the
reference's tests instead of losing its entry.

Sections are the nested models, top level first, then depth first in declaration order.

in: `JobSpec` → out: `Section`s of `FieldEntry`s; Markdown for the file, text for a terminal.
"""

from __future__ import annotations

import difflib
import json
import textwrap
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from prefixbatch.config import ShownAs
from prefixbatch.errors import UserError
from prefixbatch.jobs.spec import JobSpec

__all__ = ["REGENERATE", "FieldEntry", "Section", "explain", "spec_reference_markdown", "spec_sections"]

REGENERATE = "prefixbatch spec-reference --output docs/spec.md"

_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
_PLURALS = {str: "strings", int: "integers", float: "numbers"}


@dataclass(frozen=True)
class FieldEntry:
    """One field's reference entry; every text as a user reads it."""

    name: str  # dotted from the top: `sampling.max_tokens`
    type: str  # `integer or null`
    default: str | None  # YAML text of the default; None: the field is required
    allowed: str  # the choices or bounds; "" when any value of the type is
    description: str  # the field's docstring, on one line


@dataclass(frozen=True)
class Section:
    """A nested model of the spec: its own fields, and the names of the sections inside it."""

    name: str  # dotted; "" for the top level
    required: bool
    description: str
    fields: tuple[FieldEntry, ...]
    subsections: tuple[str, ...]


def spec_sections() -> tuple[Section, ...]:
    """Every section of `JobSpec`, the top level first, then depth first in declaration order."""
    sections = []
    pending: list[tuple[str, type[BaseModel], bool, str]] = [("", JobSpec, True, JobSpec.__doc__ or "")]
    while pending:
        prefix, model, required, description = pending.pop()
        fields, inner = [], []
        for name, info in model.model_fields.items():
            dotted = f"{prefix}.{name}" if prefix else name
            if _is_section(info.annotation):
                inner.append((dotted, info.annotation, info.is_required(), _text(info, dotted)))
            else:
                fields.append(field_entry(dotted, info))
        subsections = tuple(name for name, *_ in inner)
        sections.append(Section(prefix, required, " ".join(description.split()), tuple(fields), subsections))
        pending.extend(reversed(inner))
    return tuple(sections)


def field_entry(name: str, info: FieldInfo) -> FieldEntry:
    shown = next((m for m in info.metadata if isinstance(m, ShownAs)), None)
    return FieldEntry(
        name=name,
        type=shown.type if shown else type_name(info.annotation),
        default=None if info.is_required() else _yaml(info.get_default(call_default_factory=True)),
        allowed=shown.allowed if shown and shown.allowed else allowed_values(info),
        description=_text(info, name),
    )


def type_name(annotation: Any) -> str:
    """The annotation in a spec writer's words: `integer or null`, `list of strings`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation in _NAMES:
        return _NAMES[annotation]
    if origin is Literal:
        return " or ".join(dict.fromkeys(_NAMES[type(value)] for value in args))
    if origin in (Union, types.UnionType):
        named = [type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(named + ["null"] * (type(None) in args))
    if origin in (tuple, list) and args and args[0] in _PLURALS:
        return f"list of {_PLURALS[args[0]]}"
    if origin is dict:
        return "mapping" if args[1] is Any else f"mapping of string to {type_name(args[1])}"
    raise TypeError(f"the spec reference cannot name the type {annotation!r}: teach `type_name` it")


def allowed_values(info: FieldInfo) -> str:
    """A Literal's choices, or the bounds of the field's `ge` / `gt` / `le` / `lt` constraints."""
    choices = _literal_values(info.annotation)
    if choices:
        return ", ".join(f"`{value}`" for value in choices)
    lower = upper = None
    for item in info.metadata:
        if isinstance(item, Ge | Gt):
            lower = ("[", "≥", item.ge) if isinstance(item, Ge) else ("(", ">", item.gt)
        elif isinstance(item, Le | Lt):
            upper = ("]", "≤", item.le) if isinstance(item, Le) else (")", "<", item.lt)
        elif not isinstance(item, ShownAs):
            msg = f"the spec reference cannot show the constraint {item!r}: teach `allowed_values` it"
            raise TypeError(msg)
    if lower and upper:
        return f"in {lower[0]}{lower[2]:g}, {upper[2]:g}{upper[0]}"
    bound = lower or upper
    return f"{bound[1]} {bound[2]:g}" if bound else ""


def _literal_values(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [value for arg in get_args(annotation) for value in _literal_values(arg)]


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _text(info: FieldInfo, name: str) -> str:
    if not info.description:
        raise TypeError(f"spec field {name} has no description: give it a docstring in its model")
    return " ".join(info.description.split())


def _yaml(value: Any) -> str:
    """A default as a spec writer would type it: `null`, `true`, `[]`, `{}`, `1.0`, `auto`."""
    return value if isinstance(value, str) else json.dumps(value)


def spec_reference_markdown() -> str:
    """docs/spec.md: a line saying how it was made, an index of every field, then one
    heading per section and one per field (each a link target)."""
    sections = spec_sections()
    top = sections[0]
    lines = [
        f"_Generated by `{REGENERATE}` from the job spec's pydantic models: edit the fields'"
        " docstrings under `prefixbatch/`, then rerun it; do not edit this file._",
        "",
        "# Job spec reference",
        "",
        f"{top.description} A spec is one YAML, TOML or JSON file; `--set section.field=value`"
        " overrides a field from the command line. Unknown fields are refused (with a \"did you"
        " mean\" where one is close), so a typo never silently falls back to a default."
        " `prefixbatch validate --explain FIELD` prints any entry below in a terminal.",
        "",
        "| field | type | default | allowed |",
        "|---|---|---|---|",
        *(_index_row(entry) for section in sections for entry in section.fields),
    ]
    for section in sections:
        lines += ["", *_section_markdown(section)]
    return "\n".join(lines) + "\n"


def _index_row(entry: FieldEntry) -> str:
    cells = [f"[`{entry.name}`](#{_anchor(entry.name)})", entry.type, _default_markdown(entry), entry.allowed]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _section_markdown(section: Section) -> list[str]:
    title = f"`{section.name}`" if section.name else "Top level"
    lines = [f"## {title}", ""]
    if section.name:
        lines += [("Required. " if section.required else "") + section.description, ""]
    if section.subsections:
        links = ", ".join(f"[`{name}`](#{_anchor(name)})" for name in section.subsections)
        lines += [f"Sections inside it: {links}.", ""]
    for entry in section.fields:
        facts = [f"**type** {entry.type}", f"**default** {_default_markdown(entry)}"]
        facts += [f"**allowed** {entry.allowed}"] if entry.allowed else []
        lines += [f"### `{entry.name}`", "", " · ".join(facts), "", entry.description, ""]
    return lines[:-1]


def _default_markdown(entry: FieldEntry) -> str:
    return "required" if entry.default is None else f"`{entry.default}`"


def _anchor(name: str) -> str:
    """The id GitHub gives the heading `` `name` ``: lower case, dots and backticks dropped."""
    return name.lower().replace(".", "")


def explain(name: str) -> str:
    """A field's entry, or a section's description and its fields' entries, as terminal text;
    an unknown name is a `UserError` naming the closest fields."""
    sections = {section.name: section for section in spec_sections()}
    fields = {entry.name: entry for section in sections.values() for entry in section.fields}
    key = name.strip()
    if key in fields:
        return _entry_text(fields[key])
    if key and key in sections:
        return _section_text(sections[key])
    top_sections = [section for section in sections if section and "." not in section]
    raise UserError(_unknown_message(key, [*fields, *(s for s in sections if s)], top_sections))


def _entry_text(entry: FieldEntry) -> str:
    default = "required" if entry.default is None else entry.default
    lines = [entry.name, f"  type:     {entry.type}", f"  default:  {default}"]
    lines += [f"  allowed:  {entry.allowed.replace('`', '')}"] if entry.allowed else []
    description = textwrap.fill(entry.description, 88, initial_indent="  ", subsequent_indent="  ")
    return "\n".join([*lines, description])


def _section_text(section: Section) -> str:
    head = textwrap.fill(f"{section.name}: {section.description}", 88, subsequent_indent="  ")
    names = ", ".join(section.subsections)
    inner = [f"sections inside it: {names} (--explain one of them)"] if names else []
    return "\n\n".join([head, *inner, *(_entry_text(entry) for entry in section.fields)])


def _unknown_message(key: str, names: list[str], sections: list[str]) -> str:
    close = _close_names(key, names)
    hint = f"did you mean {', '.join(close)}?" if close else "no field has a close name."
    listed = ", ".join(sections)
    return f"unknown spec field {key!r}: {hint} Sections (--explain SECTION lists its fields): {listed}"


def _close_names(key: str, names: list[str]) -> list[str]:
    """difflib's closest whole names, then the names whose last part is the key's (`path`:
    `input.path`, `output.path`, ...) or else close to it (`max_token`: `sampling.max_tokens`),
    those in the key's own section first."""
    by_last: dict[str, list[str]] = {}
    for name in names:
        by_last.setdefault(name.rpartition(".")[2], []).append(name)
    section, _, last = key.rpartition(".")
    parts = [last] if last in by_last else difflib.get_close_matches(last, by_last, n=5, cutoff=0.8)
    from_last = [name for part in parts for name in by_last[part]]
    from_last.sort(key=lambda name: name.rpartition(".")[0] != section)
    whole = difflib.get_close_matches(key, names, n=3, cutoff=0.8)
    return list(dict.fromkeys(whole + from_last))[:5]
