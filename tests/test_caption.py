import pytest

from engine.caption import clean_caption, storable

pytestmark = pytest.mark.quick

NASTY = [
    (None, ""),
    ("", ""),
    ("   \t\n ", ""),
    ("A  dog\ton the\nbeach", "A dog on the beach"),
    ("bell\x07 and null\x00 bytes\x1b[0m", "bell and null bytes [0m"),
    ("zero\u200bwidth\ufeff joiner\u200d", "zerowidth joiner"),
    ("a\\nb\\tc", "a b c"),
    ("caf\\u00e9 cr\\u00e8me", "café crème"),
    ("smile \\ud83d\\ude00 ok", "smile 😀 ok"),
    ("lone \ud800 half", "lone half"),
    ("escaped lone \\udc00 half", "escaped lone half"),
    ("Tom &amp; Jerry&#39;s &lt;b&gt;", "Tom & Jerry's <b>"),
    ("e\u0301te\u0301", "été"),  # NFC
    (b"raw bytes \xe2\x9c\x93 \xff", "raw bytes ✓ �"),
    ("日本語のキャプション", "日本語のキャプション"),
    ("quote \\\"x\\\"", 'quote "x"'),
    ("a path C:\\photos\\dog.jpg", "a path C:\\photos\\dog.jpg"),
    (42, "42"),
]


@pytest.mark.parametrize("raw,clean", NASTY)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


@pytest.mark.parametrize("raw,_", NASTY)
def test_clean_caption_is_valid_utf8_single_line(raw, _):
    text = clean_caption(raw)
    text.encode("utf-8")  # raises on lone surrogates
    assert "\n" not in text and text == text.strip()


def test_storable_keeps_lone_surrogates_visible():
    assert storable("x\ud800y") == "x\\ud800y"
    assert storable(None) is None
