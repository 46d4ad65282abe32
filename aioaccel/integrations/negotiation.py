"""Which response type a client's ``Accept`` header asks for (RFC 9110, section 12.5.1).

The servers offer two: ``application/json`` (the default) and ``application/x-npy``. Each
is given the quality of the most specific media range that matches it (``type/subtype``
over ``type/*`` over ``*/*``); ``q=0`` means "not acceptable". Ties go to the range written
first, then to JSON. A header that names neither type (``text/html``, a browser's guess)
gets JSON, as the RFC lets a server disregard it; a header that refuses JSON by name
(``application/json;q=0``) and accepts nothing else offered gets 406.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import NotAcceptable

__all__ = ["JSON", "NPY", "NotAcceptable", "acceptable"]

JSON = "application/json"
NPY = "application/x-npy"
OFFERED = (JSON, NPY)


@dataclass(frozen=True)
class _Match:
    quality: float
    specificity: int   #: 2 type/subtype, 1 type/*, 0 */*
    position: int      #: where the range stands in the header


def acceptable(accept: str | None, offered: tuple[str, ...] = OFFERED) -> list[str]:
    """The offered types ``accept`` takes, most preferred first; raises
    :class:`NotAcceptable` when it refuses them all by name or quality."""
    if accept is None or not accept.strip():
        return list(offered)
    ranges = _parse(accept)
    matches = {kind: _best(kind, ranges) for kind in offered}
    chosen = [kind for kind in offered if (m := matches[kind]) is not None and m.quality > 0]
    chosen.sort(key=lambda kind: (-matches[kind].quality,  # type: ignore[union-attr]
                                  -matches[kind].specificity,  # type: ignore[union-attr]
                                  matches[kind].position))  # type: ignore[union-attr]
    if chosen:
        return chosen
    if matches[offered[0]] is None:  # the default is not mentioned: the header is disregarded
        return [offered[0]]
    raise NotAcceptable(f"Accept: {accept[:200]!r} refuses every type this server answers "
                        f"with: {', '.join(offered)}")


def _parse(accept: str) -> list[tuple[str, str, float]]:
    """(type, subtype, q) per media range; malformed ranges are skipped."""
    ranges = []
    for part in accept.split(",")[:64]:  # a hostile header costs at most 64 ranges
        media, *params = part.split(";")
        kind, sep, sub = media.strip().lower().partition("/")
        if not sep or not kind or not sub:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = -1.0
        if not 0.0 <= quality <= 1.0:  # not a number, NaN or out of range: ignore the range
            continue
        ranges.append((kind, sub, quality))
    return ranges


def _best(offered: str, ranges: list[tuple[str, str, float]]) -> _Match | None:
    kind, _, sub = offered.partition("/")
    best: _Match | None = None
    for position, (rkind, rsub, quality) in enumerate(ranges):
        if (rkind, rsub) == (kind, sub):
            specificity = 2
        elif rkind == kind and rsub == "*":
            specificity = 1
        elif (rkind, rsub) == ("*", "*"):
            specificity = 0
        else:
            continue
        if best is None or specificity > best.specificity:
            best = _Match(quality, specificity, position)
    return best
