"""Typed search and verifier options with defaults and closed ranges, validated into InvalidRequest
messages that name the field (as the sampler registry's Option does, plus lists)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from samplers.errors import InvalidRequest
from samplers.registry import Option


@dataclass(frozen=True)
class SearchOption:
    """A scalar option (int, float, bool, or str with choices) or a list of `item` values."""

    type: type
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    help: str = ""
    item: type | None = None  # element type of a list option (int or str)
    min_items: int = 0
    max_items: int = 64

    def check(self, field: str, value: Any) -> Any:
        if self.type is not list:
            return Option(self.type, self.default, self.minimum, self.maximum, self.choices).check(field, value)
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise InvalidRequest(f"{field}: expected a list, got {value!r}")
        if not self.min_items <= len(value) <= self.max_items:
            raise InvalidRequest(f"{field}: expected {self.min_items} to {self.max_items} items, got {len(value)}")
        out = []
        for v in value:
            if self.item is int:
                if isinstance(v, bool) or not isinstance(v, int | float) or float(v) != int(v):
                    raise InvalidRequest(f"{field}: expected integers, got {v!r}")
                v = int(v)
                if (self.minimum is not None and v < self.minimum) or (self.maximum is not None and v > self.maximum):
                    raise InvalidRequest(f"{field}: {v} is outside [{self.minimum}, {self.maximum}]")
            elif not isinstance(v, self.item):
                raise InvalidRequest(f"{field}: expected items of type {self.item.__name__}, got {v!r}")
            out.append(v)
        return tuple(out)


def check_options(spec: dict[str, SearchOption], options: dict | None, owner: str, prefix: str) -> dict:
    """Fill defaults, refuse unknown names, check every given value; errors name `prefix.option`."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(spec))
    if unknown:
        raise InvalidRequest(f"{prefix}.{unknown[0]}: not an option of {owner}; its options are "
                             f"{sorted(spec) or 'none'}")
    full = {k: o.default for k, o in spec.items()}
    for k, v in options.items():
        try:
            full[k] = spec[k].check(f"{prefix}.{k}", v)
        except InvalidRequest as err:
            msg = str(err)
            # Option.check names the field as "option 'k'"; rewrite it to the full request path.
            raise InvalidRequest(msg.replace(f"option {k!r}", f"{prefix}.{k}")) from None
    return full
