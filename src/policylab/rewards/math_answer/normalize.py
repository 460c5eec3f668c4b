"""String-level normalisation of an extracted answer (data_agents_eval.md §C1.2, policy of §C1.3).

Two layers:

* :func:`normalize_answer` cleans a whole answer string: math delimiters, ``\\left``/``\\right``,
  fraction spellings, text-command spellings, unicode symbols, malformed ``\\frac12``/``\\sqrt2``, digit
  grouping (thousands separators), ``x \\in`` prefixes, "or"/"and" list separators, trailing sentence
  punctuation.  It never decides what the answer *means*; it only makes spellings uniform.
* :func:`split_scalar_markers` looks at one scalar element (one list item, one side of a relation) and
  takes off what C1.3 treats as annotations rather than value: currency, percent, degree marker, trailing
  units (a closed list plus SI prefix + symbol; any other trailing word is part of the answer).  The markers are returned so the comparator can apply the percent / angle / unit rules.

Everything here is pure string work with bounded regular expressions (no nested quantifiers on the same
characters), so it runs in linear time even on long inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------------------
# whole-answer normalisation
# ---------------------------------------------------------------------------------------------------------

_UNICODE = {
    "\u2212": "-",  # minus sign
    "\u2013": "-",
    "\u00d7": r"\times ",
    "\u22c5": r"\cdot ",
    "\u00b7": r"\cdot ",
    "\u00f7": r"\div ",
    "\u03c0": r"\pi ",
    "\u221e": r"\infty ",
    "\u2264": r"\le ",
    "\u2265": r"\ge ",
    "\u2260": r"\ne ",
    "\u222a": r"\cup ",
    "\u2229": r"\cap ",
    "\u2208": r"\in ",
    "\u00b1": r"\pm ",
    "\u2213": r"\mp ",
    "\u221a": r"\sqrt",
    "\u00b0": r"^\circ ",
    "\u2009": " ",  # thin space (handled as a digit-group separator below when between digit groups)
    "\u202f": " ",
    "\u00a0": " ",
}

_SIZING = re.compile(r"\\(?:left|right|middle|[bB]igg?[lr]?)(?![a-zA-Z])\s*(\.|\\\{|\\\}|\\\||\\langle|\\rangle|[()\[\]|])?")
_DISPLAY = re.compile(r"\\(?:displaystyle|textstyle|scriptstyle|limits|nolimits)(?![a-zA-Z])")
_FRAC_SPELLINGS = re.compile(r"\\[dtc]frac(?![a-zA-Z])")
_TEXT_SPELLINGS = re.compile(
    r"\\(?:mathrm|mathbf|mathit|mathsf|mathtt|mathnormal|textbf|textit|textrm|textnormal|textsf|texttt|textup|"
    r"mbox|hbox|operatorname\*?|text)\s*\{"
)
# \frac12 -> \frac{1}{2}; \frac1{b}; \frac{a}2; \frac\pi4; \sqrt2 -> \sqrt{2}.  A bare argument is one digit
# (one digit run for \sqrt), one letter, or an argument-free symbol command — never a command that takes
# arguments itself (\sqrt\frac{1}{2} must stay as it is).
_SYMBOL = r"\\(?:[aA]lpha|[bB]eta|[gG]amma|[dD]elta|(?:var)?epsilon|zeta|eta|(?:var)?theta|[tT]heta|iota|kappa|[lL]ambda|mu|nu|xi|[pP]i|rho|[sS]igma|tau|upsilon|(?:var)?phi|[pP]hi|chi|[pP]si|[oO]mega|infty)(?![a-zA-Z])"
_FRAC_TWO_TOKENS = re.compile(r"\\frac\s*(\d|" + _SYMBOL + r")\s*(\d|" + _SYMBOL + r"|[a-zA-Z])")
_FRAC_TOKEN_BRACE = re.compile(r"\\frac\s*(\d|" + _SYMBOL + r")\s*\{")
_FRAC_BRACE_TOKEN = re.compile(r"\\frac\s*(\{[^{}]*\})\s*(\d|" + _SYMBOL + r"|[a-zA-Z])")
_SQRT_OF_FRAC = re.compile(r"\\sqrt\s*(\\frac\{[^{}]*\}\{[^{}]*\})")
_SQRT_TOKEN = re.compile(r"\\sqrt\s*(\d+|" + _SYMBOL + r"|[a-zA-Z])")
_PLAIN_SQRT = re.compile(r"(?<![\\a-zA-Z])sqrt\s*\(([^()]*)\)")
_PLAIN_PI = re.compile(r"(?<![\\a-zA-Z])pi(?![a-zA-Z])")
_INFINITY_WORDS = re.compile(r"\\infin(?![a-zA-Z])|(?<![\\a-zA-Z])(?:infinity|inf)(?![a-zA-Z])", re.IGNORECASE)
_REALS = re.compile(r"\\mathbb\s*\{?\s*R\s*\}?|(?i:\\text\{\s*all real numbers\s*\}|all real numbers)")
_EMPTY_SET = re.compile(r"\\(?:varnothing|emptyset)(?![a-zA-Z])|\\\{\s*\\\}")
_MEMBERSHIP_PREFIX = re.compile(r"^\s*[a-zA-Z](?:_\{?\w+\}?)?\s*\\in(?![a-zA-Z])\s*")
# digit grouping (C1.3): "\," "{,}" ",\!" between a digit and exactly three digits are thousands separators
_GROUP_SEPARATORS = re.compile(r"(?<=\d)(?:\\,|\{,\}|,\\!|\\thinspace|\\ |\u2009)(?=\d{3}(?!\d))")
# (?<!\\) keeps a matrix row break "\\" followed by a space intact
_SPACING = re.compile(r"(?<!\\)\\(?:[,;:> ]|quad|qquad|enspace|thinspace|medspace|thickspace)|~")
_NEG_SPACE = re.compile(r"(?<!\\)\\!")
_LIST_WORDS_TEXT = re.compile(r"\\text\{\s*(?:or|and)\s*\}", re.IGNORECASE)
_LIST_WORDS_BARE = re.compile(r"\s+(?:or|and)\s+")
_ESCAPED_DOLLAR = "\x00DOLLAR\x00"


def strip_math_delimiters(text: str) -> str:
    """Remove surrounding ``$…$``, ``$$…$$``, ``\\(…\\)``, ``\\[…\\]`` and stray unescaped dollars."""
    text = text.replace(r"\$", _ESCAPED_DOLLAR)
    text = text.strip()
    for opener, closer in ((r"\(", r"\)"), (r"\[", r"\]")):
        if text.startswith(opener) and text.endswith(closer) and len(text) >= 4:
            text = text[2:-2]
    text = text.replace("$", " ")
    return text.replace(_ESCAPED_DOLLAR, r"\$").strip()


def _outside_brackets_thousands(text: str) -> str:
    """Drop plain commas that are thousands separators: at bracket depth 0, ``d,ddd`` followed by a non-digit.

    C1.3: outside brackets, a comma followed by exactly three digits and a non-digit groups digits; a comma
    followed by a space is a list separator (``32, 349`` stays a 2-element list).
    """
    if "," not in text:
        return text
    out = []
    depth = 0
    n = len(text)
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif (
            ch == ","
            and depth == 0
            and i > 0
            and text[i - 1].isdigit()
            and i + 3 < n
            and text[i + 1 : i + 4].isdigit()
            and (i + 4 == n or not text[i + 4].isdigit())
            and _integer_run_start(text, i) is not None
        ):
            continue
        out.append(ch)
    return "".join(out)


def _integer_run_start(text: str, comma_at: int) -> int | None:
    """Start of the digit group before a comma if it is an integer part (not after a decimal point)."""
    j = comma_at - 1
    while j >= 0 and text[j].isdigit():
        j -= 1
    if j >= 0 and text[j] == ".":
        return None
    return j + 1


def strip_trailing_punctuation(text: str) -> str:
    """C1.3: trailing sentence punctuation (``.``, ``,``, ``;``) in or right after the answer is stripped."""
    text = text.rstrip()
    while text and text[-1] in ".,;" and not text.endswith((r"\;", r"\,")):
        text = text[:-1].rstrip()
    return text


def normalize_answer(text: str) -> str:
    """Make the spelling of one extracted answer uniform (see module docstring). Pure and linear-time."""
    for bad, good in _UNICODE.items():
        if bad in text:
            text = text.replace(bad, good)
    text = strip_math_delimiters(text)
    text = _DISPLAY.sub(" ", text)
    text = _SIZING.sub(lambda m: m.group(1) if m.group(1) and m.group(1) != "." else "", text)
    text = _FRAC_SPELLINGS.sub(r"\\frac", text)
    text = _TEXT_SPELLINGS.sub(r"\\text{", text)
    text = _GROUP_SEPARATORS.sub("", text)
    text = text.replace("{,}", ",").replace(r",\!", ",")
    text = _NEG_SPACE.sub("", text)
    text = _SPACING.sub(" ", text)
    text = _LIST_WORDS_TEXT.sub(",", text)
    text = _REALS.sub(r"(-\\infty,\\infty)", text)
    text = _EMPTY_SET.sub(r"\\emptyset", text)
    text = _INFINITY_WORDS.sub(r"\\infty", text)
    text = _PLAIN_SQRT.sub(r"\\sqrt{\1}", text)
    text = _PLAIN_PI.sub(r"\\pi", text)
    text = _FRAC_TWO_TOKENS.sub(r"\\frac{\1}{\2}", text)
    text = _FRAC_TOKEN_BRACE.sub(r"\\frac{\1}{", text)
    text = _FRAC_BRACE_TOKEN.sub(r"\\frac\1{\2}", text)
    text = _SQRT_OF_FRAC.sub(r"\\sqrt{\1}", text)
    text = _SQRT_TOKEN.sub(r"\\sqrt{\1}", text)
    text = _MEMBERSHIP_PREFIX.sub("", text)
    text = strip_trailing_punctuation(text)
    text = _outside_brackets_thousands(text)
    text = _replace_bare_list_words(text)
    text = re.sub(r"\s+", " ", text).strip()
    return strip_trailing_punctuation(text)


def _replace_bare_list_words(text: str) -> str:
    """`` or `` / `` and `` between answers -> list comma, but not inside ``\\text{...}`` (a text answer)."""
    if " or " not in text and " and " not in text:
        return text
    if text.lstrip().startswith(r"\text{") and text.rstrip().endswith("}") and text.count(r"\text{") == 1:
        return text
    return _LIST_WORDS_BARE.sub(",", text)


# ---------------------------------------------------------------------------------------------------------
# scalar markers: currency, percent, degrees, units
# ---------------------------------------------------------------------------------------------------------

# canonical unit -> spellings (singular; plural "s"/"es" accepted automatically for words of >= 3 letters)
_UNIT_SPELLINGS: dict[str, tuple[str, ...]] = {
    "mm": ("mm", "millimeter", "millimetre"),
    "cm": ("cm", "centimeter", "centimetre"),
    "m": ("m", "meter", "metre"),
    "km": ("km", "kilometer", "kilometre"),
    "in": ("inch", "inches"),
    "ft": ("ft", "foot", "feet"),
    "yd": ("yd", "yard"),
    "mi": ("mile",),
    "mg": ("mg", "milligram"),
    "g": ("g", "gram", "gm"),
    "kg": ("kg", "kilogram"),
    "lb": ("lb", "lbs", "pound"),
    "oz": ("oz", "ounce"),
    "t": ("ton", "tonne"),
    "s": ("s", "sec", "second"),
    "min": ("min", "minute"),
    "h": ("h", "hr", "hour"),
    "day": ("day",),
    "week": ("week", "wk"),
    "month": ("month",),
    "year": ("year", "yr"),
    "ml": ("ml", "milliliter", "millilitre"),
    "l": ("l", "liter", "litre"),
    "gal": ("gallon",),
    "dollar": ("dollar", "usd"),
    "cent": ("cent", "\\textcent", "\u00a2"),
    "euro": ("euro", "eur"),
    "rupee": ("rupee", "rs"),
    "mph": ("mph",),
    "km/h": ("km/h", "kmh", "kph"),
    "m/s": ("m/s",),
    "celsius": ("celsius",),
    "fahrenheit": ("fahrenheit",),
    "rad": ("rad", "radian"),
    "unit": ("unit",),  # "square units", "5 units"
}
_UNIT_LOOKUP: dict[str, str] = {}
for _canon, _names in _UNIT_SPELLINGS.items():
    for _name in _names:
        _UNIT_LOOKUP[_name] = _canon
        if len(_name) >= 3 and _name.isalpha():
            _UNIT_LOOKUP[_name + "s"] = _canon
            _UNIT_LOOKUP[_name + "es"] = _canon

_AREA_WORDS = ("square", "sq", "sq.")
_VOLUME_WORDS = ("cubic", "cu")
# words that are mathematics, not units, when they trail an expression
_MATH_WORDS = {"pi", "sin", "cos", "tan", "log", "ln", "exp", "sqrt", "infty", "i", "e"}

_CURRENCY_PREFIX = re.compile(r"^(-?)\s*(?:\\\$|US\$|USD\s*|\u20ac|\u00a3|\u00a5|\\pounds|\\euro|Rs\.?\s*)\s*")
_PERCENT_SUFFIX = re.compile(
    r"\s*(?:\\%|%|\\text\{\s*\\?%\s*\}|\\text\{\s*(?:percent|percentage|per cent|pct)\s*\}|\b(?:percent|percentage|per cent|pct)\b)\s*$",
    re.IGNORECASE,
)
_DEGREE_MARK = re.compile(
    r"\s*(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|\^\s*\{\s*o\s*\}|\\text\{\s*degrees?\s*\}|\bdegrees?\b|\bdeg\b)\s*",
    re.IGNORECASE,
)
_TEMPERATURE = re.compile(r"(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree)\s*(?:\\text\{\s*)?([CF])\s*\}?\s*$")
_TRAILING_TEXT = re.compile(r"\\text\{([^{}]*)\}\s*(?:\^\s*\{?\s*([23])\s*\}?)?\s*$")
_TRAILING_WORDS = re.compile(r"(?<=[\d}\s)])\s*((?:[A-Za-z][A-Za-z./]*\.?\s*){1,3})(?:\^\s*\{?\s*([23])\s*\}?)?\s*$")


@dataclass(frozen=True)
class ScalarMarkers:
    """Annotations taken off one scalar answer element.

    ``unit``: canonical recognised unit (``"cm"``, ``"cm^2"``, ``"dollar"``, ``"kJ"``) or None; a trailing word
    that is not a unit is never stripped (it stays in ``body``).  ``percent``/``degrees``: the answer carried ``%`` / ``°``.
    """

    body: str
    percent: bool = False
    degrees: bool = False
    unit: str | None = None


# SI prefixes (not a/z/y/h-alone ambiguities: "am", "as" are words) and the base symbols they combine with;
# a bare one-letter base symbol (N, J, W, V, A, K, L, B) is a unit only inside \\text{} (else "3 A" is 3·A)
_SI_PREFIXES = {"p": "pico", "n": "nano", "u": "micro", "\u00b5": "micro", "\u03bc": "micro", "m": "milli", "c": "centi",
                "d": "deci", "da": "deca", "h": "hecto", "k": "kilo", "M": "mega", "G": "giga", "T": "tera",
                "P": "peta", "E": "exa"}
_SI_BASES = ("m", "g", "s", "L", "l", "Pa", "N", "J", "W", "V", "A", "Hz", "K", "mol", "eV", "Wh", "B", "cal", "\u03a9")
_SI_SYMBOL = re.compile(
    "^(" + "|".join(sorted(map(re.escape, _SI_PREFIXES), key=len, reverse=True)) + ")?("
    + "|".join(sorted(map(re.escape, _SI_BASES), key=len, reverse=True)) + ")$"
)
_SI_PREFIX_WORDS = {"pico": "p", "nano": "n", "micro": "u", "milli": "m", "centi": "c", "deci": "d", "deca": "da",
                    "deka": "da", "hecto": "h", "kilo": "k", "mega": "M", "giga": "G", "tera": "T", "peta": "P"}
_SI_BASE_WORDS = {"meter": "m", "metre": "m", "gram": "g", "second": "s", "liter": "l", "litre": "l", "joule": "J",
                  "watt": "W", "volt": "V", "ampere": "A", "amp": "A", "hertz": "Hz", "newton": "N", "pascal": "Pa",
                  "byte": "B", "calorie": "cal", "mole": "mol", "kelvin": "K", "ohm": "\u03a9", "electronvolt": "eV"}


def _si_canonical(prefix: str, base: str) -> str:
    """``"m" + "L"`` -> ``"ml"`` (liters are spelled l; a result in the closed list takes its canonical name)."""
    prefix = _SI_PREFIX_WORDS.get(_SI_PREFIXES.get(prefix, ""), prefix)  # µ/μ -> u
    symbol = prefix + ("l" if base in ("L", "l") else base)
    return _UNIT_LOOKUP.get(symbol, symbol) if symbol in _UNIT_SPELLINGS else symbol


def _si_word(word: str) -> str | None:
    """``"kilojoules"`` -> ``"kJ"``, ``"joule"`` -> ``"J"`` (lower-case words; plural -s accepted)."""
    for stem in (word, word[:-1] if word.endswith("s") else None):
        if not stem:
            continue
        for spelled, prefix in (("", ""), *_SI_PREFIX_WORDS.items()):
            if stem.startswith(spelled) and stem[len(spelled):] in _SI_BASE_WORDS:
                return _si_canonical(prefix, _SI_BASE_WORDS[stem[len(spelled):]])
    return None


def _unit_token(token: str, explicit: bool) -> str | None:
    """Canonical unit of one token: the closed list (exact case first), SI prefix + symbol (case-sensitive:
    mm is milli, Mm mega), the closed list case-insensitively, then SI words; None for any other word."""
    if token in _UNIT_LOOKUP:
        return _UNIT_LOOKUP[token]
    match = _SI_SYMBOL.match(token)
    if match and (match.group(1) or len(token) > 1 or explicit):
        return _si_canonical(match.group(1) or "", match.group(2))
    lower = token.lower()
    return _UNIT_LOOKUP.get(lower) or _si_word(lower)


def canonical_unit(words: str, power: str | None = None, *, explicit: bool = False) -> str | None:
    """Canonical name of a unit phrase (``"square meters"`` -> ``"m^2"``, ``"kJ"``), or None if it is not a unit.

    ``explicit``: the phrase was written in ``\\text{}``/``\\mathrm{}``, so a one-letter SI symbol counts.
    """
    tokens = [t for t in re.split(r"[\s~]+", words.strip().rstrip(".")) if t]
    if not tokens:
        return None
    exponent = power
    if tokens[0].lower() in _AREA_WORDS and len(tokens) > 1:
        exponent, tokens = "2", tokens[1:]
    elif tokens[0].lower() in _VOLUME_WORDS and len(tokens) > 1:
        exponent, tokens = "3", tokens[1:]
    if len(tokens) == 2 and tokens[1].lower() in ("per", "hour", "hr", "h") and tokens[0].lower() in ("miles",):
        return "mph"
    if len(tokens) != 1:
        return None
    base = _unit_token(tokens[0], explicit)
    if base is None:
        return None
    return f"{base}^{exponent}" if exponent else base


def split_scalar_markers(text: str) -> ScalarMarkers:
    """Take currency, percent, degree and trailing-unit markers off one scalar (C1.3 Percent/Units/Angles)."""
    body = text.strip()
    unit: str | None = None
    percent = degrees = False

    match = _CURRENCY_PREFIX.match(body)
    if match and len(body) > match.end():
        symbol = body[len(match.group(1)) : match.end()].strip()
        unit = {"\u20ac": "euro", r"\euro": "euro", "\u00a3": "pound_sterling", r"\pounds": "pound_sterling",
                "\u00a5": "yen"}.get(symbol, "rupee" if symbol.lower().startswith("rs") else "dollar")
        body = match.group(1) + body[match.end() :]

    match = _PERCENT_SUFFIX.search(body)
    if match and match.start() > 0:
        percent, body = True, body[: match.start()].rstrip()

    match = _TEMPERATURE.search(body)
    if match and match.start() > 0:
        unit, body = ("celsius" if match.group(1) == "C" else "fahrenheit"), body[: match.start()].rstrip()
    elif _DEGREE_MARK.search(body):
        stripped = _DEGREE_MARK.sub(" ", body).strip()
        if stripped:
            degrees, body = True, stripped

    # trailing units, possibly repeated ("5\\text{ cm}^2", "12 hours", "15 sq cm"). Only recognised units
    # are taken off (issue 12): any other trailing word ("7 thousand", "25 squared", "5 is wrong") stays in
    # the body, so the answer only matches a gold that has the same words
    for _ in range(2):
        match = _TRAILING_TEXT.search(body)
        if match and match.start() > 0 and body[: match.start()].strip():
            words, power = match.group(1), match.group(2)
            found = canonical_unit(words, power, explicit=True)
            if found is None:  # also "\\text{13}": a number, not a unit
                break
            unit, body = found, body[: match.start()].rstrip()
            continue
        match = _TRAILING_WORDS.search(body)
        if match and match.start() > 0 and body[: match.start()].strip():
            words, power = match.group(1), match.group(2)
            if any(t in _MATH_WORDS for t in words.lower().split()):
                break
            found = canonical_unit(words, power)
            if found is None:  # "2 x" is a product with a variable; "7 thousand" is not 7
                break
            unit, body = found, body[: match.start()].rstrip()
            continue
        break
    return ScalarMarkers(body=body.strip(), percent=percent, degrees=degrees, unit=unit)


# ---------------------------------------------------------------------------------------------------------
# number spellings inside a scalar
# ---------------------------------------------------------------------------------------------------------

_MIXED_NUMBER = re.compile(r"(?<![\d.^_}a-zA-Z\\])(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}")
_SCI_E = re.compile(r"(?<![a-zA-Z\\])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\d.])")
_DECIMAL = re.compile(r"(?<![\d.])(\d*)\.(\d+)(?![\d.])|(?<![\d.])(\d+)\.(?![\d.a-zA-Z])")


def read_mixed_numbers(text: str) -> str:
    """C1.3: an integer literal immediately followed by a numeric ``\\frac`` is a mixed number (``1\\frac12``)."""
    return _MIXED_NUMBER.sub(r"(\1+\\frac{\2}{\3})", text)


def exact_decimals(text: str) -> tuple[str, bool]:
    """Rewrite decimal literals as exact fractions keeping their written precision (C1.1 step 3).

    Returns the rewritten text and whether any decimal literal was present (the comparator then applies
    the 6-decimal rounding rule of C1.3).
    """
    text = _SCI_E.sub(r"\1\\times 10^{\2}", text)
    found = False

    def to_fraction(match: re.Match) -> str:
        nonlocal found
        found = True
        if match.group(3) is not None:  # "5." -> "5"
            return match.group(3)
        whole, frac = match.group(1) or "0", match.group(2)
        numerator = int(whole + frac)
        return "(\\frac{%d}{%d})" % (numerator, 10 ** len(frac))

    return _DECIMAL.sub(to_fraction, text), found
