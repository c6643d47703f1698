"""Text cleaning: an ordered, configurable pipeline of steps that documents stream through one at a time.

A pipeline is built once from the request's steps (`[{"name": ..., "options": {...}}]`) and validated up
front, so a bad option fails the request before any work is queued. Documents then go through `apply` one
by one, which lets a job clean a corpus of any size: the only state that grows is the dedup steps' indexes
of hashes. Every step counts what it saw, kept and changed, and keeps a few examples, so a user can see what
each step did to their data and tune it.

Options arrive from a `google.protobuf.Struct`, where every number is a float: an integral float is
accepted where an int is meant, anything else is rejected with the offending field named.
"""

from __future__ import annotations

import functools
import hashlib
import html
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
from datasketch import LeanMinHash, MinHashLSH

from fastserve.runtime.errors import InvalidArgument

MAX_EXAMPLES = 3
MAX_STEPS = 32
# A mask token replaces every match: a long one would multiply the size of a document full of URLs.
MAX_TOKEN_CHARS = 64
EXAMPLE_CHARS = 160
# Each side of a "before -> after" example gets half the example's length.
_SIDE_CHARS = (EXAMPLE_CHARS - len(" -> ")) // 2
# Characters shown before the first difference, so an edit deep inside a long document is still visible.
_CONTEXT_CHARS = 20


@dataclass
class StepReport:
    """What one step did to the documents applied so far; maps onto the `StepReport` message."""

    name: str
    documents_in: int = 0
    documents_out: int = 0  # documents that left the step (not dropped)
    documents_changed: int = 0  # documents whose text the step modified (drops not counted)
    examples: list[str] = field(default_factory=list)


class _BadOption(Exception):
    """Raised by a step for one bad option; the pipeline turns it into InvalidArgument naming the field."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


def _coerce(key: str, value: object, kind: type) -> object:
    """The option's value as `kind` (the type of its default), accepting the floats a Struct carries."""
    if kind is bool or kind is str:
        if isinstance(value, kind):
            return value
        raise _BadOption(key, f"must be {'true or false' if kind is bool else 'a string'}, got {value!r}")
    # bool is a subclass of int, but `true` for a number is a caller's mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadOption(key, f"must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _BadOption(key, f"must be a finite number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise _BadOption(key, f"must be a whole number, got {value!r}")
        return int(value)
    return float(value)


class _Step:
    """One cleaning step: `__call__` returns the cleaned text, or None to drop the document.

    `defaults` lists the step's options; each default's type is the option's type. Subclasses take every
    option as a keyword argument and check ranges in `__init__`, raising _BadOption.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, object]] = {}

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> _Step:
        values = dict(cls.defaults)
        for key, value in options.items():
            if key not in cls.defaults:
                known = ", ".join(cls.defaults) or "none"
                raise _BadOption(str(key), f"is not an option of {cls.name} (options: {known})")
            values[key] = _coerce(key, value, type(cls.defaults[key]))
        return cls(**values)

    def __call__(self, text: str) -> str | None:
        raise NotImplementedError


# UAX #15's stream-safe format: a run of non-starters is broken after this many by U+034F (CGJ). Canonical
# reordering sorts each run by insertion (quadratic in C, holding the GIL), so an unbroken run of 64 KiB of
# alternating marks would take seconds; no real text has runs this long.
_MAX_NON_STARTERS = 30
_CGJ = "\u034f"
# Characters of combining class 0 whose compatibility decomposition is only non-starters (UAX #15, 13).
_DECOMPOSING_NON_STARTERS = "\u0f73\u0f75\u0f81\uff9e\uff9f"


@functools.cache
def _non_starter_run() -> re.Pattern[str]:
    """Runs of more than _MAX_NON_STARTERS non-starters; built on first need (a scan of every code point)."""
    marks = [chr(c) for c in range(0x110000) if unicodedata.combining(chr(c))] + list(_DECOMPOSING_NON_STARTERS)
    cls = "".join(re.escape(ch) for ch in marks)
    return re.compile(f"([{cls}]{{{_MAX_NON_STARTERS}}})(?=[{cls}])")


class _Nfkc(_Step):
    """Folds compatibility forms (fullwidth letters, ligatures, superscripts) so equal text compares equal."""

    name = "nfkc"

    def __call__(self, text: str) -> str:
        # The quick check is linear and already-normal text (most of it) needs nothing more.
        if unicodedata.is_normalized("NFKC", text):
            return text
        return unicodedata.normalize("NFKC", _non_starter_run().sub("\\1" + _CGJ, text))


class _StripControl(_Step):
    """Removes invisible characters that split words and defeat dedup, keeping tab and line breaks."""

    name = "strip_control"
    _KEPT = frozenset("\t\n\r")

    def __call__(self, text: str) -> str:
        # isprintable() is False for every Cc and Cf character, so printable text needs no scan.
        if text.isprintable():
            return text
        return "".join(ch for ch in text if ch in self._KEPT or unicodedata.category(ch) not in ("Cc", "Cf"))


_BLOCK_TAGS = frozenset("""
address article aside blockquote br dd div dl dt figcaption figure footer h1 h2 h3 h4 h5 h6 header hr li main nav
ol p pre section table td th tr ul
""".split())
_RAW_TEXT_TAGS = ("script", "style")  # their content is code, never prose
# A tag needs a name right after '<', so prose such as "a < b" survives.
_TAG_NAME = re.compile(r"</?([A-Za-z][\w:.-]*)")
_ATTR_STOP = re.compile(r"[>\"']")
_RAW_TEXT_END = {tag: re.compile(rf"</{tag}\s*>", re.IGNORECASE) for tag in _RAW_TEXT_TAGS}


def _tag_end(text: str, start: int, bound: int) -> int:
    """Index of the '>' closing the attributes that begin at `start`, or -1. Quoted values may hold '>'.

    A tag never spans a '<' (`bound` is the next one): each '<' then scans only up to the next, so the
    whole document is scanned once, where a backtracking match re-scanned to the end for every unclosed tag.
    """
    at = start
    while (stop := _ATTR_STOP.search(text, at, bound)) is not None:
        if stop.group() == ">":
            return stop.start()
        close = text.find(stop.group(), stop.end(), bound)
        if close < 0:
            return -1
        at = close + 1
    return -1


def _html_text(text: str) -> str:
    """The text of an HTML document, in one forward pass: tags removed (block tags become a line break),
    comments, <script> and <style> dropped with their content (an unclosed one runs to the end)."""
    out: list[str] = []
    kept = 0  # text[kept:i] is prose not yet copied to `out`
    i = text.find("<")
    while i >= 0:
        resume = -1
        if text.startswith("<!--", i):
            close = text.find("-->", i + 4)
            resume = len(text) if close < 0 else close + 3
            out.append(text[kept:i])
        elif (name := _TAG_NAME.match(text, i)) is not None or text.startswith(("<!", "<?"), i):
            bound = text.find("<", i + 1)
            bound = len(text) if bound < 0 else bound
            if name is None:  # <!DOCTYPE ...>, <?xml ...?>
                end = text.find(">", i, bound)
            else:
                after = name.end()
                if text.startswith(">", after):
                    end = after
                elif text.startswith("/>", after):
                    end = after + 1
                elif after < bound and text[after].isspace():
                    end = _tag_end(text, after, bound)
                else:
                    end = -1
            if end >= 0:
                out.append(text[kept:i])
                resume = end + 1
                tag = name.group(1).lower() if name else ""
                if tag in _BLOCK_TAGS:
                    out.append("\n")
                elif tag in _RAW_TEXT_TAGS and not text.startswith("</", i):
                    close_tag = _RAW_TEXT_END[tag].search(text, resume)
                    resume = len(text) if close_tag is None else close_tag.end()
        if resume < 0:  # a '<' that starts no tag is prose
            i = text.find("<", i + 1)
            continue
        kept = resume
        i = text.find("<", resume)
    out.append(text[kept:])
    return "".join(out)


class _StripHtml(_Step):
    """Reduces HTML to its text. Block tags become line breaks so paragraphs don't run into one word."""

    name = "strip_html"

    def __call__(self, text: str) -> str:
        if "<" not in text and "&" not in text:
            return text
        # Unescaping last keeps an escaped "&lt;b&gt;" as the literal text "<b>" rather than removing it.
        return html.unescape(_html_text(text))


_URL = re.compile(r"\b(?:(?:https?|ftp)://|www\.(?=\w))[^\s<>\"']+", re.IGNORECASE)
_CLOSERS = {")": "(", "]": "[", "}": "{"}


class _MaskUrls(_Step):
    """Replaces URLs with a token: they are noise to a language model and may identify people."""

    name = "mask_urls"
    defaults = {"token": "<url>"}

    def __init__(self, token: str) -> None:
        if len(token) > MAX_TOKEN_CHARS:
            raise _BadOption("token", f"must be at most {MAX_TOKEN_CHARS} characters, got {len(token)}")
        self.token = token

    def __call__(self, text: str) -> str:
        return _URL.sub(self._replace, text)

    def _replace(self, match: re.Match[str]) -> str:
        # Sentence punctuation and an unbalanced closing bracket after a URL belong to the prose around it.
        url = match.group()
        unbalanced = {closer: url.count(closer) - url.count(opener) for closer, opener in _CLOSERS.items()}
        end = len(url)
        while url[end - 1] in ".,;:!?" or unbalanced.get(url[end - 1], 0) > 0:
            unbalanced[url[end - 1]] = unbalanced.get(url[end - 1], 0) - 1
            end -= 1
        return self.token + url[end:]


# The local part may not follow '/' or ':' (a URL's path or userinfo: "http://user@host.com/"), except
# after "mailto:"; the domain may not run on into a path or another '@' ("@alice/post", "bob@x.com/path").
_EMAIL = re.compile(
    r"(?:(?<=mailto:)|(?<![\w.%+@/:-]))"
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
    r"(?![\w@/-]|\.[\w-])",
    re.IGNORECASE,
)


class _MaskEmails(_Step):
    """Replaces e-mail addresses with a token, for privacy, leaving URLs that merely contain '@' alone."""

    name = "mask_emails"
    defaults = {"token": "<email>"}

    def __init__(self, token: str) -> None:
        if len(token) > MAX_TOKEN_CHARS:
            raise _BadOption("token", f"must be at most {MAX_TOKEN_CHARS} characters, got {len(token)}")
        self.token = token

    def __call__(self, text: str) -> str:
        return _EMAIL.sub(lambda _: self.token, text)


_MANY_NEWLINES = re.compile(r"\n{3,}")


class _CollapseWhitespace(_Step):
    """Normalizes spacing; with keep_newlines, paragraph structure survives (at most one blank line)."""

    name = "collapse_whitespace"
    defaults = {"keep_newlines": False}

    def __init__(self, keep_newlines: bool) -> None:
        self.keep_newlines = keep_newlines

    def __call__(self, text: str) -> str:
        if not self.keep_newlines:
            return " ".join(text.split())
        # splitlines() also ends lines at \r\n, \r and Unicode separators, so every break becomes one \n.
        lines = (" ".join(line.split()) for line in text.splitlines())
        return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip("\n")


class _Lowercase(_Step):
    name = "lowercase"

    def __call__(self, text: str) -> str:
        return text.lower()


class _LengthFilter(_Step):
    """Drops documents too short to carry signal or too long to be prose; 0 means no bound."""

    name = "length_filter"
    defaults = {"min_chars": 0, "max_chars": 0, "min_tokens": 0, "max_tokens": 0}

    def __init__(self, min_chars: int, max_chars: int, min_tokens: int, max_tokens: int) -> None:
        for key, value in (("min_chars", min_chars), ("max_chars", max_chars),
                           ("min_tokens", min_tokens), ("max_tokens", max_tokens)):
            if value < 0:
                raise _BadOption(key, f"must be >= 0 (0 = no bound), got {value}")
        for low_key, low, high_key, high in (("min_chars", min_chars, "max_chars", max_chars),
                                             ("min_tokens", min_tokens, "max_tokens", max_tokens)):
            if low and high and low > high:
                raise _BadOption(low_key, f"({low}) must not exceed {high_key} ({high})")
        self.chars = (min_chars, max_chars)
        self.tokens = (min_tokens, max_tokens)

    def __call__(self, text: str) -> str | None:
        if not text or text.isspace():
            return None
        if not _within(len(text), *self.chars):
            return None
        if any(self.tokens) and not _within(len(text.split()), *self.tokens):
            return None
        return text


def _within(value: int, low: int, high: int) -> bool:
    return value >= low and (not high or value <= high)


def _digest(text: str, size: int) -> bytes:
    # surrogatepass: a lone surrogate (possible in a str from JSON) must hash, not crash the job.
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=size).digest()


class _DedupExact(_Step):
    """Drops repeats of a text already seen. Stores a 16-byte digest per text, never the text itself."""

    name = "dedup_exact"

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def __call__(self, text: str) -> str | None:
        digest = _digest(text, 16)
        if digest in self._seen:
            return None
        self._seen.add(digest)
        return text


_MERSENNE = (1 << 61) - 1
_MERSENNE_U64 = np.uint64(_MERSENNE)
_LOW_31 = np.uint64((1 << 31) - 1)
_LOW_30 = np.uint64((1 << 30) - 1)
_MINHASH_SEED = 20240531
# Shingles hashed per numpy batch: bounds the (num_perm x batch) temporaries for very long documents.
_SHINGLE_BATCH = 4096
_MIN_NUM_PERM, _MAX_NUM_PERM = 2, 512
_MAX_SHINGLE = 32
# Documents one LSH band may hold; bounds the comparisons per document (see _DedupNear).
_MAX_BUCKET = 256


def _mulmod_mersenne(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(a * x) mod 2**61-1, elementwise (broadcasting), for uint64 arrays with values below 2**61.

    The full product needs 122 bits, so both factors are split into 31-bit halves; powers of two are then
    folded back with 2**61 = 1 (mod 2**61-1), keeping every intermediate below 2**64.
    """
    a_hi, a_lo = a >> np.uint64(31), a & _LOW_31
    x_hi, x_lo = x >> np.uint64(31), x & _LOW_31
    middle = a_hi * x_lo + a_lo * x_hi  # < 2**62, to be multiplied by 2**31
    middle = (middle >> np.uint64(30)) + ((middle & _LOW_30) << np.uint64(31))  # < 2**61 + 2**32
    high = (a_hi * x_hi) << np.uint64(1)  # a_hi * x_hi * 2**62 = a_hi * x_hi * 2 (mod p); < 2**61
    return (high + middle + a_lo * x_lo) % _MERSENNE_U64  # sum < 2**63 + 2**32


# datasketch weighs false positives against false negatives when it splits the signature into bands. A
# false positive costs one signature comparison (which then rejects it); a false negative is a duplicate
# kept, so recall weighs more: at the defaults, 1 in 4,000 pairs of Jaccard 0.93 is missed instead of 1 in 20.
_LSH_WEIGHTS = (0.1, 0.9)


@functools.lru_cache(maxsize=256)
def _lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """datasketch's (bands, rows) for a threshold: it integrates false positive and negative rates over every
    split, about 0.1 s at num_perm 512, so each pair is derived once per process."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=_LSH_WEIGHTS)
    return lsh.b, lsh.r


class _DedupNear(_Step):
    """Drops documents whose word shingles overlap an earlier kept document's (MinHash + LSH).

    Each kept document's MinHash signature goes into a datasketch MinHashLSH index. A new document is
    compared only with the documents sharing a band with it, and is dropped when its signature agrees with
    one of theirs in at least `threshold` of positions (an estimate of their Jaccard similarity). Shingles
    are hashed with blake2b and the permutations come from a fixed seed, so results are the same in every
    process. `bands` 0 lets datasketch choose bands and rows for the threshold.

    Work per document is bounded: a document with _MAX_BUCKET candidates or more (one of a dense cluster of
    similar but distinct texts) is kept without being indexed, so no band ever holds more than _MAX_BUCKET.
    """

    name = "dedup_near"
    defaults = {"threshold": 0.8, "num_perm": 64, "bands": 0, "shingle": 3}

    def __init__(self, threshold: float, num_perm: int, bands: int, shingle: int) -> None:
        if not 0 < threshold < 1:
            raise _BadOption("threshold", f"must be in (0, 1), got {threshold} (dedup_exact drops exact repeats)")
        if not _MIN_NUM_PERM <= num_perm <= _MAX_NUM_PERM:
            raise _BadOption("num_perm", f"must be between {_MIN_NUM_PERM} and {_MAX_NUM_PERM}, got {num_perm}")
        if bands:
            if not 2 <= bands <= num_perm:
                raise _BadOption("bands", f"must be 0 (derived from threshold) or in [2, num_perm], got {bands}")
            if num_perm % bands:
                raise _BadOption("num_perm", f"({num_perm}) must be divisible by bands ({bands})")
            params = (bands, num_perm // bands)
        else:
            try:
                params = _lsh_bands(threshold, num_perm)
            except ValueError:  # datasketch's best split has a single band
                raise _BadOption("num_perm", f"({num_perm}) is too small for threshold {threshold}: raise "
                                             "num_perm or set bands") from None
        if not 1 <= shingle <= _MAX_SHINGLE:
            raise _BadOption("shingle", f"must be between 1 and {_MAX_SHINGLE}, got {shingle}")
        self.threshold = threshold
        self.shingle = shingle
        # RandomState's stream is frozen across numpy versions, unlike Generator's.
        rng = np.random.RandomState(_MINHASH_SEED)
        self._a = rng.randint(1, _MERSENNE, size=(num_perm, 1), dtype=np.uint64)
        self._b = rng.randint(0, _MERSENNE, size=(num_perm, 1), dtype=np.uint64)
        self._lsh = MinHashLSH(num_perm=num_perm, params=params)
        self._signatures = np.empty((16, num_perm), dtype=np.uint64)  # row i: kept document i; grows by doubling
        self._indexed = 0

    def signature(self, text: str) -> np.ndarray:
        """MinHash signature (num_perm uint64 values) of the text's word shingles."""
        words = text.split()
        n = self.shingle
        # A document shorter than one shingle is a single shingle of all its words.
        shingles = {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
        hashes = np.frombuffer(b"".join(_digest(s, 8) for s in shingles), dtype="<u8") % _MERSENNE_U64
        signature = np.full(len(self._a), _MERSENNE, dtype=np.uint64)
        for start in range(0, len(hashes), _SHINGLE_BATCH):
            batch = hashes[np.newaxis, start:start + _SHINGLE_BATCH]
            permuted = (_mulmod_mersenne(self._a, batch) + self._b) % _MERSENNE_U64
            np.minimum(signature, permuted.min(axis=1), out=signature)
        return signature

    def __call__(self, text: str) -> str | None:
        signature = self.signature(text)
        # The signature is computed here, not by datasketch, to stay the same across datasketch releases.
        minhash = LeanMinHash(seed=_MINHASH_SEED, hashvalues=signature, scheme="affine64")
        candidates = self._lsh.query(minhash)
        if candidates:
            agreement = (self._signatures[np.fromiter(candidates, dtype=np.int64)] == signature).mean(axis=1)
            if (agreement >= self.threshold).any():
                return None
        if len(candidates) < _MAX_BUCKET:
            if self._indexed == len(self._signatures):
                self._signatures = np.concatenate([self._signatures, np.empty_like(self._signatures)])
            self._signatures[self._indexed] = signature
            self._lsh.insert(self._indexed, minhash, check_duplication=False)
            self._indexed += 1
        return text


_EN_STOPWORDS = frozenset("""
a about after all also an and any are as at be because been before but by can could did do does for from
get had has have he her here him his how i if in into is it its just like may me more most my no not now
of on one only or other our out over said she should so some such than that the their them then there
these they this those to up us very was we were what when where which while who why will with would you
your
""".split())
_WORD = re.compile(r"[^\W\d_]+")  # runs of letters


def _is_latin(letter: str) -> bool:
    """Whether a letter is ASCII or Latin script (accented and extended Latin, IPA, fullwidth)."""
    return (letter < "\u02b0" or "\u1e00" <= letter <= "\u1eff" or "\u2c60" <= letter <= "\u2c7f"
            or "\ua720" <= letter <= "\ua7ff" or "\uff21" <= letter <= "\uff5a")


class _LanguageFilter(_Step):
    """A cheap filter for text in the wanted language: mostly Latin letters and, for English, enough of its
    commonest words. Documents without letters (numbers, symbols) are always dropped.

    language "any" skips the stopword test but still applies min_script_ratio; set it to 0 to keep any script.
    """

    name = "language_filter"
    defaults = {"language": "en", "min_script_ratio": 0.8, "min_stopword_ratio": 0.05}
    LANGUAGES = ("en", "any")

    def __init__(self, language: str, min_script_ratio: float, min_stopword_ratio: float) -> None:
        if language not in self.LANGUAGES:
            raise _BadOption("language", f"must be one of {', '.join(self.LANGUAGES)}, got {language!r}")
        for key, value in (("min_script_ratio", min_script_ratio), ("min_stopword_ratio", min_stopword_ratio)):
            if not 0 <= value <= 1:
                raise _BadOption(key, f"must be in [0, 1], got {value}")
        self.language = language
        self.min_script_ratio = min_script_ratio
        self.min_stopword_ratio = min_stopword_ratio

    def __call__(self, text: str) -> str | None:
        letters = [ch for ch in text if ch.isalpha()]
        if not letters:
            return None
        if sum(map(_is_latin, letters)) / len(letters) < self.min_script_ratio:
            return None
        if self.language == "en":
            words = _WORD.findall(text.lower())
            if sum(word in _EN_STOPWORDS for word in words) / max(1, len(words)) < self.min_stopword_ratio:
                return None
        return text


_STEPS: dict[str, type[_Step]] = {step.name: step for step in (
    _Nfkc, _StripControl, _StripHtml, _MaskUrls, _MaskEmails, _CollapseWhitespace, _Lowercase, _LengthFilter,
    _DedupExact, _DedupNear, _LanguageFilter,
)}
STEP_NAMES: tuple[str, ...] = tuple(_STEPS)


def _build_step(index: int, spec: object) -> _Step:
    where = f"steps[{index}]"
    if not isinstance(spec, Mapping):
        raise InvalidArgument(f"{where} must be an object with a name and options", field=where)
    for key in spec:
        if key not in ("name", "options"):
            raise InvalidArgument(f"{where} has unknown key {key!r} (expected name, options)", field=f"{where}.{key}")
    name = spec.get("name")
    if not isinstance(name, str) or name not in _STEPS:
        raise InvalidArgument(f"{where}.name: unknown step {name!r}; expected one of {', '.join(STEP_NAMES)}",
                              field=f"{where}.name")
    options = spec.get("options")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise InvalidArgument(f"{where}.options must be an object, got {options!r}", field=f"{where}.options")
    try:
        return _STEPS[name].from_options(options)
    except _BadOption as error:
        raise InvalidArgument(f"{where} ({name}): option {error.key!r} {error.problem}",
                              field=f"{where}.options.{error.key}") from None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _excerpt(text: str, start: int) -> str:
    shown = ("…" if start else "") + text[start:start + _SIDE_CHARS]
    return _clip(repr(shown), _SIDE_CHARS)


def _change_example(before: str, after: str) -> str:
    """Before and after, both starting a little before the first difference so the edit shows."""
    common = min(len(before), len(after))
    first_difference = next((i for i in range(common) if before[i] != after[i]), common)
    start = max(0, first_difference - _CONTEXT_CHARS)
    return f"{_excerpt(before, start)} -> {_excerpt(after, start)}"


def _drop_example(text: str) -> str:
    prefix = "dropped: "
    return prefix + _clip(repr(text[:EXAMPLE_CHARS]), EXAMPLE_CHARS - len(prefix))


class CleaningPipeline:
    """Ordered cleaning steps that documents stream through one at a time, with a report per step."""

    def __init__(self, steps: list[dict]) -> None:
        """steps: [{"name": str, "options": dict}, ...] in order. Validates everything up front:
        unknown name -> InvalidArgument(field=f"steps[{i}].name"), unknown option key or bad value ->
        InvalidArgument(field=f"steps[{i}].options.{key}"), more than MAX_STEPS -> InvalidArgument(field="steps").
        An empty list is allowed (identity)."""
        if not isinstance(steps, list | tuple):
            raise InvalidArgument(f"steps must be a list, got {type(steps).__name__}", field="steps")
        if len(steps) > MAX_STEPS:
            raise InvalidArgument(f"at most {MAX_STEPS} steps, got {len(steps)}", field="steps")
        self._steps = [_build_step(i, spec) for i, spec in enumerate(steps)]
        self._reports = [StepReport(step.name) for step in self._steps]

    def apply(self, text: str) -> str | None:
        """Run one document through every step; None when a step dropped it (later steps don't see it)."""
        for step, report in zip(self._steps, self._reports, strict=True):
            report.documents_in += 1
            cleaned = step(text)
            if cleaned is None:
                if len(report.examples) < MAX_EXAMPLES:
                    report.examples.append(_drop_example(text))
                return None
            report.documents_out += 1
            if cleaned != text:
                report.documents_changed += 1
                if len(report.examples) < MAX_EXAMPLES:
                    report.examples.append(_change_example(text, cleaned))
            text = cleaned
        return text

    def reports(self) -> list[StepReport]:
        """One report per step, in order, counting everything applied so far (copies: safe to keep)."""
        return [replace(report, examples=list(report.examples)) for report in self._reports]


def clean_texts(texts: list[str], steps: list[dict]) -> tuple[list[str], list[StepReport]]:
    """Convenience for small inline requests: the surviving cleaned texts (in order) and the reports."""
    pipeline = CleaningPipeline(steps)
    cleaned = [result for text in texts if (result := pipeline.apply(text)) is not None]
    return cleaned, pipeline.reports()
