"""The cleaning pipeline: each step on crafted inputs, the reports, option validation and determinism."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastserve.runtime.errors import InvalidArgument
from fastserve.services.preprocessing.cleaning import (
    EXAMPLE_CHARS,
    STEP_NAMES,
    CleaningPipeline,
    StepReport,
    _mulmod_mersenne,
    clean_texts,
)
from tests.support.rpc import field_of as only_field

ROOT = Path(__file__).resolve().parents[2]


def run(step: str, texts: list[str], **options: object) -> list[str]:
    return clean_texts(texts, [{"name": step, "options": options}])[0]


def one(step: str, text: str, **options: object) -> str | None:
    return CleaningPipeline([{"name": step, "options": options}]).apply(text)


def paragraph(seed: int, words: int = 120) -> str:
    """A long paragraph of real-looking words; different seeds give unrelated paragraphs."""
    vocabulary = ("river stone market window garden letter silver morning engine harbor paper valley "
                  "candle winter bridge forest signal orange travel museum kitchen island thunder pocket "
                  "ladder mirror planet rabbit shadow theory violin wallet yellow anchor basket circle "
                  "desert falcon guitar helmet jacket lantern meadow needle oyster pillow quartz ribbon").split()
    rng = random.Random(seed)
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def test_step_names_in_documented_order():
    assert STEP_NAMES == ("nfkc", "strip_control", "strip_html", "mask_urls", "mask_emails", "collapse_whitespace",
                          "lowercase", "length_filter", "dedup_exact", "dedup_near", "language_filter")


def test_empty_pipeline_is_identity():
    texts = ["  <b>Raw</b> ", "", "same", "same"]
    cleaned, reports = clean_texts(texts, [])
    assert cleaned == texts
    assert reports == []


# --- text-changing steps ----------------------------------------------------------------------------------


def test_nfkc_folds_compatibility_forms():
    assert one("nfkc", "Ｈｅｌｌｏ ﬁne x²") == "Hello fine x2"


def test_strip_control_removes_control_and_format_characters():
    assert one("strip_control", "a\u200bb\x07c") == "abc"
    assert one("strip_control", "\ufeffso\u00adft\u200e \u2060x\u200c\u200dy\x00\x7f\x9f") == "soft xy"
    assert one("strip_control", "tab\there\nline\r\nend") == "tab\there\nline\r\nend"


def test_strip_html_drops_tags_scripts_and_comments_and_unescapes():
    html = "<p>Hi <b>there</b>&amp; you</p><script>x()</script>"
    assert one("strip_html", html) == "\nHi there& you\n"
    messy = ('<STYLE type="text/css">p { color: red }</STYLE><!-- note -->'
             '<a href="x?a=1&b=2" title="a>b">link</a> &lt;b&gt; a < b<br/>end<script>never closed')
    assert one("strip_html", messy) == "link <b> a < b\nend"
    assert one("strip_html", "no markup here") == "no markup here"


def test_mask_urls_masks_urls_and_keeps_surrounding_punctuation():
    text = "Docs: https://example.com/a?b=1, mirror www.example.org. (ftp://files.example.net/pub) and http://x.io/w_(a)"
    assert one("mask_urls", text) == "Docs: <url>, mirror <url>. (<url>) and <url>"
    assert one("mask_urls", "see HTTP://Example.com now", token="[LINK]") == "see [LINK] now"
    assert one("mask_urls", "a www or wwwx.com or http text") == "a www or wwwx.com or http text"


def test_mask_emails_masks_addresses_but_not_urls():
    text = "Mail bob.smith+tag@mail.example.co.uk or alice@example.com. mailto:carol@example.org"
    assert one("mask_emails", text) == "Mail <email> or <email>. mailto:<email>"
    url_like = ("https://medium.com/@alice/post http://user@host.example.com/path ftp://anonymous@ftp.example.com "
                "http://user:pw@host.example.com bob@example.com/path user@localhost")
    assert one("mask_emails", url_like) == url_like
    assert one("mask_emails", "x alice@example.com", token="") == "x "


def test_collapse_whitespace():
    assert one("collapse_whitespace", "  a \t b\n\n\n c \u00a0 ") == "a b c"
    text = "  a \t b  \n\n\n\n  c  \r\n d \n\n"
    assert one("collapse_whitespace", text, keep_newlines=True) == "a b\n\nc\nd"


def test_lowercase():
    assert one("lowercase", "Hello ÉCOLE") == "hello école"


# --- filters ----------------------------------------------------------------------------------------------


def test_length_filter_bounds_and_blank_documents():
    texts = ["", "   \n", "ab", "abcd", "one two three", "x" * 30]
    assert run("length_filter", texts) == ["ab", "abcd", "one two three", "x" * 30]
    assert run("length_filter", texts, min_chars=3, max_chars=20) == ["abcd", "one two three"]
    assert run("length_filter", texts, min_tokens=2.0) == ["one two three"]
    assert run("length_filter", texts, max_tokens=1) == ["ab", "abcd", "x" * 30]


def test_dedup_exact_keeps_first_occurrence_in_order():
    cleaned, [report] = clean_texts(["a", "b", "a", "c", "b", "a "], [{"name": "dedup_exact"}])
    assert cleaned == ["a", "b", "c", "a "]
    assert (report.documents_in, report.documents_out, report.documents_changed) == (6, 4, 0)
    assert report.examples == ["dropped: 'a'", "dropped: 'b'"]


def test_dedup_near_drops_near_duplicates_and_keeps_unrelated_text():
    original = paragraph(1)
    words = original.split()
    words[60] = "zeppelin"
    one_word_changed = " ".join(words)
    unrelated = paragraph(2)
    half_changed = " ".join(w if i % 2 else "zeppelin" for i, w in enumerate(original.split()))
    texts = [original, unrelated, one_word_changed, half_changed, "short text", "short text", "other words"]
    assert run("dedup_near", texts) == [original, unrelated, half_changed, "short text", "other words"]


def test_dedup_near_threshold_decides():
    original = paragraph(3)
    words = original.split()
    for i in range(0, len(words), 10):  # one word in ten: Jaccard of 3-shingles about 0.55
        words[i] = "zeppelin"
    edited = " ".join(words)
    assert run("dedup_near", [original, edited]) == [original, edited]
    assert run("dedup_near", [original, edited], threshold=0.3) == [original]


def test_dedup_near_same_result_in_fresh_pipelines():
    texts = [paragraph(seed, words=40) for seed in range(20)]
    texts += [t.replace("river", "brook", 1) for t in texts[:10]]
    steps = [{"name": "dedup_near", "options": {"threshold": 0.7, "num_perm": 128.0, "bands": 32}}]
    first, second = clean_texts(texts, steps), clean_texts(texts, steps)
    assert first == second
    assert first[1][0].documents_out < len(texts)


def test_dedup_near_signature_is_the_same_in_other_processes():
    """blake2b and a seeded RandomState, not Python's salted hash(): other hash seeds give the same signature."""
    code = ("import json; from fastserve.services.preprocessing.cleaning import _DedupNear; "
            "print(json.dumps(_DedupNear(0.8, 64, 16, 3).signature('the quick brown fox jumps').tolist()))")
    signatures = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        signatures.append(json.loads(out.stdout))
    pipeline = CleaningPipeline([{"name": "dedup_near"}])
    here = pipeline._steps[0].signature("the quick brown fox jumps").tolist()
    assert signatures[0] == signatures[1] == here


def test_mulmod_mersenne_matches_exact_integer_arithmetic():
    p = (1 << 61) - 1
    rng = random.Random(7)
    a = [1, 2, p - 1, (1 << 31) - 1, 1 << 31] + [rng.randrange(1, p) for _ in range(50)]
    x = [0, 1, p - 1, (1 << 60) + 12345, 1 << 31] + [rng.randrange(0, p) for _ in range(50)]
    result = _mulmod_mersenne(np.array(a, dtype=np.uint64)[:, None], np.array(x, dtype=np.uint64)[None, :])
    assert result.tolist() == [[ai * xi % p for xi in x] for ai in a]


def test_language_filter():
    english = "The cat sat on the mat and it was happy."
    cyrillic, chinese, numbers, german = ("Привет, как у тебя дела сегодня?", "我今天很高兴见到你。", "1, 2, 3, 4, 5",
                                          "Der Hund läuft schnell über die Wiese.")
    texts = [english, cyrillic, chinese, numbers, german]
    assert run("language_filter", texts) == [english]
    assert run("language_filter", texts, language="any") == [english, german]
    assert run("language_filter", texts, language="any", min_script_ratio=0) == [english, cyrillic, chinese, german]
    assert run("language_filter", [english], min_stopword_ratio=0.9) == []


# --- reports ----------------------------------------------------------------------------------------------


def test_reports_count_in_out_changed_across_steps():
    steps = [{"name": "strip_html"}, {"name": "length_filter", "options": {"min_chars": 4}}, {"name": "dedup_exact"}]
    texts = ["<b>Hello</b>", "Hello", "<i>no</i>", "plain text", "plain text", "<p>x</p>"]
    cleaned, reports = clean_texts(texts, steps)
    assert cleaned == ["Hello", "plain text"]
    assert reports == [
        StepReport("strip_html", 6, 6, 3,
                   ["'<b>Hello</b>' -> 'Hello'", "'<i>no</i>' -> 'no'", "'<p>x</p>' -> '\\nx\\n'"]),
        StepReport("length_filter", 6, 4, 0, ["dropped: 'no'", "dropped: '\\nx\\n'"]),
        StepReport("dedup_exact", 4, 2, 0, ["dropped: 'Hello'", "dropped: 'plain text'"]),
    ]


def test_pipeline_streams_and_reports_are_snapshots():
    pipeline = CleaningPipeline([{"name": "lowercase"}, {"name": "dedup_exact"}])
    assert pipeline.apply("Hi") == "hi"
    assert pipeline.apply("HI") is None
    snapshot = pipeline.reports()
    snapshot[0].examples.clear()
    assert pipeline.apply("there") == "there"
    counts = [(r.documents_in, r.documents_out, r.documents_changed) for r in pipeline.reports()]
    assert counts == [(3, 3, 2), (3, 2, 0)]
    assert pipeline.reports()[0].examples == ["'Hi' -> 'hi'", "'HI' -> 'hi'"]


def test_examples_are_capped_and_truncated_around_the_change():
    long_texts = [f"{i} " + "word " * 200 + "<b>bold</b> tail" for i in range(5)]
    _, [report] = clean_texts(long_texts, [{"name": "strip_html"}])
    assert report.documents_changed == 5
    assert len(report.examples) == 3
    for example in report.examples:
        assert len(example) <= EXAMPLE_CHARS
        before, after = example.split(" -> ")
        assert before.startswith("'…") and "<b>bold</b>" in before
        assert "<b>" not in after and "bold tail" in after
    _, [drops] = clean_texts(["y" * 1000], [{"name": "length_filter", "options": {"max_chars": 10}}])
    assert drops.examples[0].startswith("dropped: 'yyy") and drops.examples[0].endswith("…")
    assert len(drops.examples[0]) <= EXAMPLE_CHARS


# --- validation -------------------------------------------------------------------------------------------


def field_of(steps: list) -> str:
    with pytest.raises(InvalidArgument) as caught:
        CleaningPipeline(steps)
    return only_field(caught.value)


@pytest.mark.parametrize(("steps", "field"), [
    ([{"name": "nfkc"}, {"name": "stem"}], "steps[1].name"),
    ([{"options": {}}], "steps[0].name"),
    ([{"name": "mask_urls", "options": {"tokn": "<u>"}}], "steps[0].options.tokn"),
    ([{"name": "nfkc", "options": {"form": "NFC"}}], "steps[0].options.form"),
    ([{"name": "length_filter", "options": {"min_chars": 2.5}}], "steps[0].options.min_chars"),
    ([{"name": "length_filter", "options": {"max_chars": True}}], "steps[0].options.max_chars"),
    ([{"name": "length_filter", "options": {"min_tokens": -1}}], "steps[0].options.min_tokens"),
    ([{"name": "length_filter", "options": {"min_chars": 50, "max_chars": 10}}], "steps[0].options.min_chars"),
    ([{"name": "dedup_near", "options": {"threshold": 0}}], "steps[0].options.threshold"),
    ([{"name": "dedup_near", "options": {"threshold": 1.5}}], "steps[0].options.threshold"),
    ([{"name": "dedup_near", "options": {"threshold": float("nan")}}], "steps[0].options.threshold"),
    ([{"name": "dedup_near", "options": {"num_perm": 60, "bands": 16}}], "steps[0].options.num_perm"),
    ([{"name": "dedup_near", "options": {"shingle": 0}}], "steps[0].options.shingle"),
    ([{"name": "dedup_near", "options": {"shingle": 33}}], "steps[0].options.shingle"),
    ([{"name": "dedup_near", "options": {"threshold": 1}}], "steps[0].options.threshold"),
    ([{"name": "dedup_near", "options": {"num_perm": 513}}], "steps[0].options.num_perm"),
    ([{"name": "dedup_near", "options": {"num_perm": 1}}], "steps[0].options.num_perm"),
    ([{"name": "dedup_near", "options": {"num_perm": 8, "threshold": 0.95}}], "steps[0].options.num_perm"),
    ([{"name": "dedup_near", "options": {"bands": 1}}], "steps[0].options.bands"),
    ([{"name": "dedup_near", "options": {"bands": 128}}], "steps[0].options.bands"),
    ([{"name": "collapse_whitespace", "options": {"keep_newlines": 1}}], "steps[0].options.keep_newlines"),
    ([{"name": "mask_emails", "options": {"token": 5}}], "steps[0].options.token"),
    ([{"name": "nfkc"}, {"name": "language_filter", "options": {"language": "fr"}}], "steps[1].options.language"),
    ([{"name": "language_filter", "options": {"min_script_ratio": 1.2}}], "steps[0].options.min_script_ratio"),
    ([{"name": "nfkc", "options": ["x"]}], "steps[0].options"),
    (["nfkc"], "steps[0]"),
])
def test_bad_steps_name_the_field(steps: list, field: str):
    assert field_of(steps) == field


def test_integral_floats_are_accepted_for_int_options():
    steps = [{"name": "length_filter", "options": {"min_chars": 3.0, "max_tokens": 2.0}}]
    assert clean_texts(["ab", "abc", "a b c"], steps)[0] == ["abc"]
    CleaningPipeline([{"name": "dedup_near", "options": {"num_perm": 32.0, "bands": 8.0, "threshold": 0.95}}])


def test_pipeline_length_and_token_length_are_bounded():
    assert field_of([{"name": "lowercase"}] * 33) == "steps"
    CleaningPipeline([{"name": "lowercase"}] * 32)
    assert field_of([{"name": "mask_urls", "options": {"token": "x" * 65}}]) == "steps[0].options.token"


# --- complexity: every step is near-linear on hostile text ------------------------------------------------

ADVERSARIAL = {
    "unclosed script tags": "<script " * 8192,
    "unclosed comments": "<!--" * 16384,
    "tag starts": "<a" * 32768,
    "unclosed quoted attributes": '<a b="' * 10922,
    "quoted '>' without an end": "<a x='>' " * 7281,
    "declarations": "<!" * 32768,
    "script end tags without '>'": "<script>" + "</script " * 7281,
    "a@a@a": "a@" * 32768,
    "dotted local part": "a." * 32768 + "@",
    "dotted domains": "a@b." * 16384,
    "a long URL": "http://" + "a" * 60000,
    "repeated schemes": "http://" * 9362,
    "closing brackets after a URL": "http://x" + ")" * 60000,
    "alternating combining marks": "a" + "\u0301\u0316" * 32768,
    "decomposing non-starters": "a" + "\uff9e\u0334" * 32768,
    "character references": "&#" * 32768,
    "newlines": "\n" * 65536 + "x",
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_every_step_is_fast_on_adversarial_text(name: str):
    """Before: 64 KiB of '<script ' took 25 s in strip_html, holding the GIL; NFKC of alternating marks took 5 s."""
    text = ADVERSARIAL[name]
    for step in STEP_NAMES:
        pipeline = CleaningPipeline([{"name": step}])
        started = time.perf_counter()
        pipeline.apply(text)
        assert time.perf_counter() - started < 2, (name, step)


def test_strip_html_is_a_single_pass_with_the_regex_behaviour():
    assert one("strip_html", "<DIV class='a'>x</div><p-x>y") == "\nx\ny"
    assert one("strip_html", "keep <a x='unclosed and a <b>tag</b>") == "keep <a x='unclosed and a tag"
    assert one("strip_html", "<!DOCTYPE html><?xml version='1'?>text<!-- open") == "text"
    assert one("strip_html", "a<style>b</STYLE >c<script src='x'>d</script>e") == "ace"


def test_nfkc_keeps_long_runs_of_marks_normal_and_bounded():
    text = "a" + "\u0301\u0316" * 20
    folded = one("nfkc", text)
    assert folded is not None and folded.count("\u034f") == 1  # one CGJ after 30 non-starters
    assert one("nfkc", "e\u0301") == "\u00e9"


def test_dedup_near_scales_and_finds_near_duplicates():
    """20k documents, half of them near duplicates of the others (Jaccard about 0.85): the LSH index keeps
    this near-linear (all pairs would be 2e8 comparisons) and the near duplicates are still dropped."""
    originals = [paragraph(seed, words=40) for seed in range(10_000)]
    rng = random.Random(5)
    edited = []
    for text in originals:
        words = text.split()
        words[rng.randrange(len(words))] = "zeppelin"
        edited.append(" ".join(words))
    pipeline = CleaningPipeline([{"name": "dedup_near", "options": {"threshold": 0.7}}])
    started = time.perf_counter()
    kept = [text for text in originals + edited if pipeline.apply(text) is not None]
    elapsed = time.perf_counter() - started
    assert elapsed < 60, elapsed
    missed = set(kept) - set(originals)
    assert len(missed) <= 10  # MinHash estimates: a handful may slip, not a share
    assert len(kept) - len(missed) > 9_950  # unrelated paragraphs are kept
