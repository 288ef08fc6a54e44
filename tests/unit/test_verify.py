"""Verifiers on hand-written cases: numbers, boxed LaTeX, exact, auto and user functions."""

from fractions import Fraction

import pytest

from tipcli.errors import TipError
from tipcli.ops.verify import (
    auto,
    boxed,
    exact,
    find_numbers,
    get_verifier,
    last_boxed,
    last_number,
    normalize_latex,
    parse_number,
)


@pytest.mark.parametrize("text,value", [
    ("1,000", Fraction(1000)), ("-3", Fraction(-3)), ("+7", Fraction(7)), ("0.50", Fraction(1, 2)),
    (".5", Fraction(1, 2)), ("3/4", Fraction(3, 4)), ("-1,234.5", Fraction(-2469, 2)),
    ("\u22122", Fraction(-2)),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1/0", "1,00", "-", "1.2.3"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


def test_find_numbers_minus_after_digit_is_an_operator():
    assert find_numbers("5-3") == [5, 3]
    assert find_numbers("x = -3, y=(2)-1") == [-3, 2, 1]
    assert find_numbers("9+6+1=16 so 1,641.") == [9, 6, 1, 16, 1641]


@pytest.mark.parametrize("response,answer,ok", [
    ("The total is 1,000.", "1000", True),
    ("so the answer is 1000", "1,000", True),
    ("it is -3", "3", False),
    ("it is 3", "-3", False),
    ("x = -3", "-3", True),
    ("half: 0.50", "0.5", True),
    ("half: 1/2", "0.5", True),
    ("first 12 then 13", "12", False),
    ("no number here", "12", False),
    ("7+5+0=12 8+6+1=15 4+0+1=5 so 552", "552", True),
    ("7+5+0=12 8+6+1=15 4+0+1=5 so 553", "552", False),
])
def test_last_number(response, answer, ok):
    assert last_number(response, answer) is ok


@pytest.mark.parametrize("response,answer,ok", [
    (r"so \boxed{\frac{1}{2}}", "0.5", True),
    (r"so \boxed{\frac{1}{2}}", "1/2", True),
    (r"\boxed{\dfrac{1}{2}} and then some text 7", r"\frac12", True),
    (r"\boxed{ \tfrac{3}{4} }", r"\boxed{0.75}", True),
    (r"\boxed{-\frac{1}{2}}", "-0.5", True),
    (r"\boxed{\frac{1}{2}}", "-0.5", False),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{\left( 1, 2 \right)}", "(1,2)", True),
    (r"\boxed{\text{12 }}.", "12", True),
    (r"\boxed{x^{2}+1}", "x^{2} + 1", True),
    (r"\boxed{2} then \boxed{3}", "2", False),
    (r"no box, answer 0.5", "0.5", False),
    (r"\boxed{90^\circ}", "90", True),
])
def test_boxed(response, answer, ok):
    assert boxed(response, answer) is ok


def test_last_boxed_nested_braces_and_unclosed():
    assert last_boxed(r"a \boxed{\frac{1}{2}} b") == r"\frac{1}{2}"
    assert last_boxed(r"a \boxed{1") is None
    assert normalize_latex(r"$\dfrac{3}{4}$") == "3/4"


def test_exact_and_auto():
    assert exact("  Paris\n", "Paris") and not exact("paris", "Paris")
    assert auto(r"... \boxed{\frac{1}{2}}", "0.5")
    assert auto("so 1,000", "1000")
    assert auto(" blue ", "blue") and not auto("blue sky", "blue")


def test_user_verifier_from_module_and_file(tmp_path, monkeypatch):
    (tmp_path / "myverify.py").write_text(
        "def lower(response, answer):\n    return response.lower().strip() == answer.lower()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = get_verifier("myverify:lower")
    assert f("PARIS ", "paris") and not f("Rome", "paris")
    g = get_verifier(f"{tmp_path / 'myverify.py'}:lower")
    assert g("Rome", "rome")


@pytest.mark.parametrize("spec,needle", [
    ("no_such_module_xyz:f", "could not import verifier 'no_such_module_xyz:f'"),
    ("tipcli.ops.verify:no_such_function", "has no function 'no_such_function'"),
    ("/nonexistent/file.py:f", "could not import verifier"),
    ("nonsense", "unknown verifier 'nonsense'"),
])
def test_bad_user_verifier_one_line_error(spec, needle):
    with pytest.raises(TipError) as exc:
        get_verifier(spec)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
