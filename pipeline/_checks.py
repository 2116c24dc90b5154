"""Value checks for config fields: each takes the field's dotted key and its value, and returns
the value in its canonical form (an enum member, a tuple) or raises a :class:`ConfigError` that
names the key and what would be valid.

>>> integer(minimum=1)("run.batch_size", 8)
8
>>> integer(minimum=1)("run.batch_size", 0)
Traceback (most recent call last):
...
pipeline.errors.ConfigError: run.batch_size: must be at least 1, got 0
>>> size()("source.preprocess.crop", 224)
(224, 224)
>>> auto_or(integer(1))("run.actors", "auto")
'auto'
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import ConfigError, close_matches

#: A check: ``(key, value) -> value``.
Check = Callable[[str, Any], Any]


def choice(kind: type[enum.Enum]) -> Check:
    """A member of ``kind``, given as itself or by its value (any case)."""
    valid = [m.value for m in kind]

    def check(key: str, value: Any) -> enum.Enum:
        if isinstance(value, kind):
            return value
        if isinstance(value, str) and value.lower() in valid:
            return kind(value.lower())
        hint = close_matches(value, valid) if isinstance(value, str) else f"valid: {valid}"
        raise ConfigError(key, f"{value!r} is not valid; {hint}")
    return check


#: A number with an exponent that YAML 1.1 (PyYAML) reads as text: no dot, or no sign in the exponent.
_EXPONENT_TEXT = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+")


def _read_as_text(value: Any, whole: bool = False) -> str:
    """For a number YAML read as text, how to write it so that it reads as one (``whole``: an
    integer); else nothing.

    >>> _read_as_text("125e-5"), _read_as_text("1e20"), _read_as_text("1e3", whole=True)
    (' (YAML reads 125e-5 as text: write 0.00125)', ' (YAML reads 1e20 as text: write 1.0e+20)', ' (YAML reads 1e3 as text: write 1000)')
    >>> _read_as_text("abc"), _read_as_text("1e400"), _read_as_text("1.5e0", whole=True)
    ('', '', '')
    """
    if not isinstance(value, str) or not _EXPONENT_TEXT.fullmatch(value.strip()):
        return ""
    number = float(value)
    if not math.isfinite(number) or (number == 0 and any(c in "123456789" for c in value.split("e")[0].split("E")[0])):
        return ""  # (too large, or too small, for any spelling)
    if whole:
        if not number.is_integer() or abs(number) >= 2**63:
            return ""
        spelled = str(int(number))
    else:
        spelled = repr(number)  # the shortest text that reads back as the same number
        if "e" in spelled:  # YAML 1.1 wants a dot and a signed exponent
            mantissa, exponent = spelled.split("e")
            mantissa += "" if "." in mantissa else ".0"
            spelled = f"{mantissa}e{exponent if exponent[0] in '+-' else '+' + exponent}"
    return f" (YAML reads {value.strip()} as text: write {spelled})"


def integer(minimum: int | None = None, optional: bool = False, maximum: int | None = None) -> Check:
    def check(key: str, value: Any) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}{_read_as_text(value, whole=True)}")
        if minimum is not None and value < minimum:
            raise ConfigError(key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(key, f"must be at most {maximum:,}, got {value:,}")
        return value
    return check


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(minimum: float = 0.0, above: bool = False, valid: str = "", maximum: float = math.inf) -> Check:
    """A finite number of at least ``minimum`` (more than it, with ``above``) and at most
    ``maximum``, as a float; ``valid`` adds what to give to the message of a number out of range.

    >>> number()("run.gpus_per_actor", float("nan"))
    Traceback (most recent call last):
    ...
    pipeline.errors.ConfigError: run.gpus_per_actor: expected a finite number, got nan
    >>> number(maximum=60)("run.stop_grace", 1e20)
    Traceback (most recent call last):
    ...
    pipeline.errors.ConfigError: run.stop_grace: must be at most 60, got 1e+20
    """
    def check(key: str, value: Any) -> float:
        if not _is_real(value) or not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value!r}{_read_as_text(value)}")
        if value < minimum or (above and value == minimum):
            raise ConfigError(key, f"must be {'more than' if above else 'at least'} {minimum:g}, got {value:g}"
                              + (f"; {valid}" if valid else ""))
        if value > maximum:
            raise ConfigError(key, f"must be at most {maximum:g}, got {value:g}" + (f"; {valid}" if valid else ""))
        return float(value)
    return check


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def text(optional: bool = False) -> Check:
    """A non-empty string (or ``None`` when ``optional``)."""
    def check(key: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"expected a non-empty string, got {value!r}")
        return value
    return check


def target(key: str, value: Any) -> str | None:
    """A ``package.module:callable`` name, or ``None``."""
    value = text(optional=True)(key, value)
    if value is not None and ":" not in value:
        raise ConfigError(key, f"{value!r} is not of the form 'package.module:callable'")
    return value


def names(optional: bool = True) -> Check:
    """A list of names (column names), as a tuple."""
    def check(key: str, value: Any) -> tuple[str, ...] | None:
        if value is None and optional:
            return None
        if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"expected a list of column names, got {value!r}")
        return tuple(value)
    return check


def extensions(key: str, value: Any) -> tuple[str, ...] | None:
    """File extensions in order of preference: a list, or one string of them separated by
    ``;`` (WebDataset's ``"jpg;png"``); in lower case, without a leading dot.

    >>> extensions("source.image_extensions", "jpg;.PNG")
    ('jpg', 'png')
    """
    if value is None:
        return None
    items = value.split(";") if isinstance(value, str) else value
    if (isinstance(items, str) or not isinstance(items, Sequence) or not items
            or not all(isinstance(v, str) and v.strip().lstrip(".") for v in items)):
        raise ConfigError(key, f"expected file extensions in order of preference, such as [jpg, png] or 'jpg;png', "
                          f"got {value!r}")
    return tuple(dict.fromkeys(v.strip().lstrip(".").lower() for v in items))


def size(optional: bool = True) -> Check:
    """An image size: one int (square) or ``[height, width]``, as a tuple."""
    def check(key: str, value: Any) -> tuple[int, int] | None:
        if value is None and optional:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise ConfigError(key, f"expected a positive int or [height, width], got {value!r}")
        return (int(value[0]), int(value[1]))
    return check


def one_of(*valid: Any) -> Check:
    """One of the values ``valid`` (compared with ``==``, booleans excluded)."""
    def check(key: str, value: Any) -> Any:
        if isinstance(value, bool) or value not in valid:
            shown = " or ".join(repr(v) for v in valid)
            raise ConfigError(key, f"{value!r} is not valid; valid: {shown}")
        return value
    return check


def paths(key: str, value: Any) -> str | tuple[str, ...] | None:
    """A path or pattern, or a non-empty list of them."""
    if value is None or (isinstance(value, str) and value):
        return value
    if (isinstance(value, Sequence) and not isinstance(value, str) and value
            and all(isinstance(v, str) and v for v in value)):
        return tuple(value)
    raise ConfigError(key, f"expected a path, glob or brace pattern, or a list of them, got {value!r}")


def mapping(key: str, value: Any) -> dict:
    """A mapping (``None`` is an empty one), as a dict."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping, got {value!r}")
    return dict(value)


def plain_data(key: str, value: Any, nan: bool = False, _within: tuple[int, ...] = ()) -> None:
    """Refuse, naming its key, a value a config cannot hold: it is stored in the dump's manifest
    as JSON and compared with a rerun's, so only text, numbers, booleans, null, lists and
    mappings (whose number, boolean and null keys JSON writes as text); no value that holds
    itself (a YAML alias to its own mapping); and no NaN (unless ``nan``: a field's own check
    then judges it), which equals nothing, not even itself, so that no rerun could match it.

    >>> plain_data("kwargs", {"scale": float("nan")})
    Traceback (most recent call last):
    ...
    pipeline.errors.ConfigError: kwargs.scale: NaN cannot be compared with a rerun's value (it equals nothing, not even itself); give a number or null
    """
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if value != value and not nan:
            raise ConfigError(key, "NaN cannot be compared with a rerun's value (it equals nothing, not even itself); "
                              "give a number or null")
        return
    if isinstance(value, (Mapping, list, tuple)):
        if id(value) in _within:
            raise ConfigError(key, "holds itself (a YAML alias to a mapping or list it is in); write the value out")
        _within += (id(value),)
    if isinstance(value, Mapping):
        written: dict[str, Any] = {}  # each key as the manifest's JSON writes it
        for name, item in value.items():
            if name is not None and not isinstance(name, (str, int, float)):
                raise ConfigError(key, f"the key {name!r} is a {type(name).__name__}; keys are text or numbers")
            text = name if isinstance(name, str) else json.dumps(name)
            if text in written:
                raise ConfigError(key, f"the keys {written[text]!r} and {name!r} are one key, {text!r}, in the dump's "
                                  "manifest (JSON writes keys as text); keep one")
            written[text] = name
            plain_data(f"{key}.{name}" if key else str(name), item, nan, _within)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            plain_data(f"{key}[{i}]", item, nan, _within)
        return
    raise ConfigError(key, f"a {type(value).__name__} ({value!r}) cannot be stored in the dump's manifest; give text, "
                      "a number, a boolean, null, a list or a mapping")


def plain_mapping(key: str, value: Any) -> dict:
    """A mapping of free values (a builder's keyword arguments), as a dict: what a manifest holds
    and a rerun's config can equal (:func:`plain_data`)."""
    data = mapping(key, value)
    plain_data(key, data)
    return data


def auto_or(check: Check) -> Check:
    """``"auto"`` (in any case), or a value that passes ``check``, whose message then says that
    auto is valid too.

    >>> auto_or(integer(1))("run.actors", "AUTO")
    'auto'
    >>> auto_or(integer(1))("run.actors", "automatic")
    Traceback (most recent call last):
    ...
    pipeline.errors.ConfigError: run.actors: expected an integer, got 'automatic'; or auto
    """
    def auto_or_check(key: str, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return check(key, value)
        except ConfigError as exc:
            if exc.message.endswith("auto"):  # (its message says so already)
                raise
            raise ConfigError(key, f"{exc.message}; or auto") from None
    return auto_or_check


def layer_ids(key: str, value: Any) -> tuple[str, ...]:
    """One or more distinct layer ids (``named_modules()`` names)."""
    layers = [value] if isinstance(value, str) else value
    if not isinstance(layers, Sequence) or not layers:
        raise ConfigError(key, f"expected a non-empty list of layer ids, got {layers!r}")
    for layer in layers:
        if not isinstance(layer, str) or not layer:
            raise ConfigError(key, f"{layer!r} is not a layer id; layer ids are named_modules() names "
                              "such as 'layer3' (see `actmap layers MODEL`); quote ids with selectors in "
                              "YAML lists: [\"encoder.layer.3[0]\"]")
    if len(set(layers)) != len(layers):
        raise ConfigError(key, f"lists a layer twice: {list(layers)}")
    return tuple(layers)


#: The normalisation presets by name (``None``: keep images in [0, 1]).
NORMALIZE_PRESETS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": None,
}
_NORMALIZE_VALID = "'imagenet', 'none', 'model' or {mean: [r, g, b], std: [r, g, b]}"


def normalization(key: str, value: Any) -> str | dict[str, list[float]]:
    """A preset name, or ``{mean: [r, g, b], std: [r, g, b]}`` with positive ``std``."""
    if isinstance(value, str):
        if value.lower() not in NORMALIZE_PRESETS and value.lower() != "model":
            raise ConfigError(key, f"{value!r} is not valid; valid: {_NORMALIZE_VALID}")
        return value.lower()
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"{value!r} is not valid; valid: {_NORMALIZE_VALID}")
    if set(value) != {"mean", "std"} or not all(
            isinstance(value[k], Sequence) and not isinstance(value[k], str) and len(value[k]) == 3
            for k in ("mean", "std")):
        raise ConfigError(key, f"expected {{mean: [r, g, b], std: [r, g, b]}}, got {dict(value)!r}")
    for name in ("mean", "std"):
        if not all(_is_real(v) and math.isfinite(v) for v in value[name]):
            raise ConfigError(f"{key}.{name}", f"expected three finite numbers, got {list(value[name])!r}")
    if any(s <= 0 for s in value["std"]):
        raise ConfigError(f"{key}.std", f"must be positive, got {list(value['std'])!r}")
    return {"mean": [float(v) for v in value["mean"]], "std": [float(v) for v in value["std"]]}
