"""Language tags: any valid BCP-47 / ISO 639 tag (``sw``, ``quy``, ``zh-Hant``, ``gn``), checked by
`langcodes <https://github.com/georgkrause/langcodes>`_ against the IANA subtag registry, never by a
hand-kept list of the languages someone thought of.

Tags are kept as written, not normalised: they name records, report rows and Parquet values, and a
tag rewritten on the way (``iw`` -> ``he``) would stop matching the records made with it. Which
languages form a group (high-, low-resource, held out) is configuration, never code.
"""

from __future__ import annotations

from collections.abc import Iterable

import langcodes


def problem(tag: object) -> str | None:
    """Why ``tag`` is not a language tag, or None when it is one."""
    if not isinstance(tag, str) or not tag.strip():
        return "empty"
    if "_" in tag:
        # langcodes reads zh_Hant as zh-Hant; a Parquet value or record key spelled two ways would not.
        hint = f" (did you mean {langcodes.standardize_tag(tag)!r}?)" if langcodes.tag_is_valid(tag) else ""
        return f"not a BCP-47 tag: subtags are separated by '-'{hint}"
    if not langcodes.tag_is_valid(tag):
        return "not a valid BCP-47 / ISO 639 language tag"
    return None


def invalid(tags: Iterable[object]) -> dict[str, str]:
    """The tags among ``tags`` that are not language tags, each with why (empty: all are fine)."""
    found = {}
    for tag in tags:
        why = problem(tag)
        if why and str(tag) not in found:
            found[str(tag)] = why
    return found


def describe(bad: dict[str, str]) -> str:
    """``"'xx' is not a valid BCP-47 / ISO 639 language tag"``, one clause per tag."""
    return "; ".join(f"{tag!r} is {why}" for tag, why in bad.items())
