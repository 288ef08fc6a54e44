"""Verifiers: does a response's answer equal the reference answer?

    tip eval --model runs/student --prompts arith.jsonl --verifier last-number -o runs/eval
    tip eval --model M --prompts math.jsonl --verifier boxed -o runs/eval
    tip eval --model M --prompts p.jsonl --verifier mypkg.grading:is_correct -o runs/eval

Every verifier is a function ``(response: str, answer: str) -> bool``:

- ``exact``: the two strings equal once surrounding whitespace is stripped;
- ``last-number``: the last number in the response equals the answer's number. Numbers
  are compared as exact fractions, so ``1,000`` == ``1000``, ``0.50`` == ``0.5`` ==
  ``1/2``, and ``-3`` != ``3``. A ``-`` right after a digit or letter is a minus
  operator, not a sign (``5-3`` ends in ``3``);
- ``boxed``: the content of the response's last ``\\boxed{...}`` against the answer
  (itself boxed or not), after light LaTeX normalisation (``\\dfrac``/``\\frac``,
  ``\\left(``, ``\\text{}``, spaces, ``$``); numbers compare as fractions, so
  ``\\boxed{\\frac{1}{2}}`` == ``0.5``. Text after the box is ignored;
- ``auto``: ``boxed`` when the response holds a ``\\boxed{}``, else ``last-number``
  when the answer is a number, else ``exact``;
- ``module:function`` (or ``path/to/file.py:function``): a function of your own.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from tipcli.configs import VERIFIERS
from tipcli.errors import TipError, first_line

Verifier = Callable[[str, str], bool]

_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])[-+\u2212])?"          # a sign, unless it follows a word or bracket
    r"(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"  # 1,000 or 1000, with decimals (or .5)
    r"(?:/\d+(?:\.\d+)?)?")                  # an optional /denominator


def parse_number(text: str) -> Fraction | None:
    """A number written as ``-1,234.50``, ``.5``, ``3/4`` or ``+7`` as a fraction; None
    when ``text`` (stripped) is not exactly one such number."""
    text = text.strip().replace("\u2212", "-")
    m = re.fullmatch(r"([-+]?)((?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?)(?:/(\d+(?:\.\d+)?))?", text)
    if not m or not re.search(r"\d", m.group(2)):
        return None
    value = Fraction(m.group(2).replace(",", ""))
    if m.group(3) is not None:
        if Fraction(m.group(3)) == 0:
            return None
        value /= Fraction(m.group(3))
    return -value if m.group(1) == "-" else value


def find_numbers(text: str) -> list[Fraction]:
    """Every number in ``text``, in order (see the module docstring for the rules)."""
    out = []
    for m in _NUMBER.finditer(text):
        value = parse_number(m.group(0)) if re.search(r"\d", m.group(0)) else None
        if value is not None:
            out.append(value)
    return out


def exact(response: str, answer: str) -> bool:
    """Equal after stripping surrounding whitespace."""
    return response.strip() == answer.strip()


def last_number(response: str, answer: str) -> bool:
    """The response's last number equals the answer's (last) number."""
    got, want = find_numbers(response), find_numbers(answer)
    if not want:
        return exact(response, answer)
    return bool(got) and got[-1] == want[-1]


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def normalize_latex(text: str) -> str:
    """A canonical string of a LaTeX answer: fractions as ``(a)/(b)``, no spacing,
    sizing, ``$`` or ``\\text{}`` wrappers, no thousands commas, no trailing period."""
    s = text.strip().strip("$").strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[,;:! ]|~", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)   # \frac12
    prev = None
    while prev != s:
        prev = s
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    return re.sub(r"\((-?[\d.]+)\)", r"\1", s)


def _latex_value(text: str) -> Fraction | None:
    s = normalize_latex(text)
    m = re.fullmatch(r"(-?)\(?([-+]?[\d.]+)\)?/\(?([\d.]+)\)?", s)
    if m:
        num, den = parse_number(m.group(2)), parse_number(m.group(3))
        if num is None or not den:
            return None
        return -num / den if m.group(1) else num / den
    return parse_number(s)


def boxed(response: str, answer: str) -> bool:
    """The last ``\\boxed{}`` of the response equals the answer, after normalisation."""
    got = last_boxed(response)
    if got is None:
        return False
    want = last_boxed(answer)
    want = answer if want is None else want
    a, b = _latex_value(got), _latex_value(want)
    if a is not None and b is not None:
        return a == b
    return normalize_latex(got) == normalize_latex(want)


def auto(response: str, answer: str) -> bool:
    """``boxed`` if the response has a box, else ``last-number`` if the answer is a
    number, else ``exact``."""
    if last_boxed(response) is not None:
        return boxed(response, answer)
    if _latex_value(answer) is not None:
        return last_number(response, answer)
    return exact(response, answer)


def get_verifier(name: str) -> Verifier:
    """A built-in verifier by name, or a ``module:function`` / ``file.py:function``."""
    builtin = {"auto": auto, "exact": exact, "last-number": last_number, "boxed": boxed}
    if name in builtin:
        return builtin[name]
    if ":" not in name:
        raise TipError(f"unknown verifier '{name}'; use one of {', '.join(VERIFIERS)} or "
                       "module:function")
    module_name, _, func_name = name.rpartition(":")
    module = _import(module_name, name)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise TipError(f"verifier '{name}': {module_name} has no function '{func_name}'")
    return func


def _import(module_name: str, spec_text: str):
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec is None or not Path(module_name).is_file():
                raise FileNotFoundError(f"no file {module_name}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code
        raise TipError(f"could not import verifier '{spec_text}': {type(exc).__name__}: "
                       f"{first_line(exc)}") from None
