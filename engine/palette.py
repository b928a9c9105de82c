"""Palettes as ImageMagick 6 reads them: colour names, grayNN, hex, RGB triples; and the order
in which IM's octree visits a palette's colours (engine/condition.py's remap relies on it)."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

DEFAULT_PALETTE = "black,gray50,white"
MAX_PALETTE_COLORS = 256  # IM6's default -colors budget, and all a PNG palette can hold

# ImageMagick 6.9.11's colour table entries for the CSS/SVG colour names, first match wins as in
# IM (so "gray" is IM's 7e7e7e and "grey" X11's bebebe, unlike CSS). grayNN/greyNN are computed.
_IM_NAMES = """
aliceblue:f0f8ff antiquewhite:faebd7 aqua:00ffff aquamarine:7fffd4 azure:f0ffff beige:f5f5dc
bisque:ffe4c4 black:000000 blanchedalmond:ffebcd blue:0000ff blueviolet:8a2be2 brown:a52a2a
burlywood:deb887 cadetblue:5f9ea0 chartreuse:7fff00 chocolate:d2691e coral:ff7f50
cornflowerblue:6495ed cornsilk:fff8dc crimson:dc143c cyan:00ffff darkblue:00008b darkcyan:008b8b
darkgoldenrod:b8860b darkgray:a9a9a9 darkgreen:006400 darkgrey:a9a9a9 darkkhaki:bdb76b
darkmagenta:8b008b darkolivegreen:556b2f darkorange:ff8c00 darkorchid:9932cc darkred:8b0000
darksalmon:e9967a darkseagreen:8fbc8f darkslateblue:483d8b darkslategray:2f4f4f darkslategrey:2f4f4f
darkturquoise:00ced1 darkviolet:9400d3 deeppink:ff1493 deepskyblue:00bfff dimgray:696969
dimgrey:696969 dodgerblue:1e90ff firebrick:b22222 floralwhite:fffaf0 forestgreen:228b22
fuchsia:ff00ff gainsboro:dcdcdc ghostwhite:f8f8ff gold:ffd700 goldenrod:daa520 gray:7e7e7e
green:008000 greenyellow:adff2f grey:bebebe honeydew:f0fff0 hotpink:ff69b4 indianred:cd5c5c
indigo:4b0082 ivory:fffff0 khaki:f0e68c lavender:e6e6fa lavenderblush:fff0f5 lawngreen:7cfc00
lemonchiffon:fffacd lightblue:add8e6 lightcoral:f08080 lightcyan:e0ffff lightgoldenrodyellow:fafad2
lightgray:d3d3d3 lightgreen:90ee90 lightgrey:d3d3d3 lightpink:ffb6c1 lightsalmon:ffa07a
lightseagreen:20b2aa lightskyblue:87cefa lightslategray:778899 lightslategrey:778899
lightsteelblue:b0c4de lightyellow:ffffe0 lime:00ff00 limegreen:32cd32 linen:faf0e6 magenta:ff00ff
maroon:800000 mediumaquamarine:66cdaa mediumblue:0000cd mediumorchid:ba55d3 mediumpurple:9370db
mediumseagreen:3cb371 mediumslateblue:7b68ee mediumspringgreen:00fa9a mediumturquoise:48d1cc
mediumvioletred:c71585 midnightblue:191970 mintcream:f5fffa mistyrose:ffe4e1 moccasin:ffe4b5
navajowhite:ffdead navy:000080 oldlace:fdf5e6 olive:808000 olivedrab:6b8e23 orange:ffa500
orangered:ff4500 orchid:da70d6 palegoldenrod:eee8aa palegreen:98fb98 paleturquoise:afeeee
palevioletred:db7093 papayawhip:ffefd5 peachpuff:ffdab9 peru:cd853f pink:ffc0cb plum:dda0dd
powderblue:b0e0e6 purple:800080 red:ff0000 rosybrown:bc8f8f royalblue:4169e1 saddlebrown:8b4513
salmon:fa8072 sandybrown:f4a460 seagreen:2e8b57 seashell:fff5ee sienna:a0522d silver:c0c0c0
skyblue:87ceeb slateblue:6a5acd slategray:708090 slategrey:708090 snow:fffafa springgreen:00ff7f
steelblue:4682b4 tan:d2b48c teal:008080 thistle:d8bfd8 tomato:ff6347 turquoise:40e0d0 violet:ee82ee
wheat:f5deb3 white:ffffff whitesmoke:f5f5f5 yellow:ffff00 yellowgreen:9acd32
"""
NAMED_COLORS: dict[str, tuple[int, int, int]] = {
    name: (int(hx[0:2], 16), int(hx[2:4], 16), int(hx[4:6], 16))
    for name, hx in (item.split(":") for item in _IM_NAMES.split())
}
_GRAY_NN = re.compile(r"gr[ae]y(\d{1,3})")
_HEX = re.compile(r"#([0-9a-f]{3}|[0-9a-f]{6})")


# ---------------------------------------------------------------------------------------------
# palette parsing


def gray_level(percent: int) -> int:
    """8-bit level of ImageMagick's grayNN: int(NN * 2.55 + 0.5) in doubles (gray50 is 127)."""
    return int(percent * 2.55 + 0.5)


def parse_color(token: str) -> tuple[int, int, int]:
    """One colour as ImageMagick names it: a table name, grayNN/greyNN, #RGB or #RRGGBB."""
    name = token.strip().lower().replace(" ", "")
    if name in NAMED_COLORS:
        return NAMED_COLORS[name]
    if (m := _GRAY_NN.fullmatch(name)) and int(m.group(1)) <= 100:
        level = gray_level(int(m.group(1)))
        return (level, level, level)
    if m := _HEX.fullmatch(name):
        digits = m.group(1)
        if len(digits) == 3:  # IM widens #RGB by repeating each nibble
            digits = "".join(c * 2 for c in digits)
        return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))
    raise ValueError(f"unknown colour {token!r}: use an ImageMagick/CSS name, grayNN (0-100) or #RRGGBB")


def parse_palette(spec: str | Sequence) -> np.ndarray:
    """A palette as a (K, 3) uint8 array from "black,gray50,white", names, hex or RGB triples."""
    items = [t for t in spec.split(",") if t.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("empty palette: give at least one colour, e.g. --palette black,gray50,white")
    try:
        rows = [parse_color(c) if isinstance(c, str) else tuple(int(v) for v in c) for c in items]
        palette = np.asarray(rows, dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"palette entries must be colour names, #RRGGBB or RGB triples: {err}") from None
    if palette.ndim != 2 or palette.shape[1] != 3 or palette.min() < 0 or palette.max() > 255:
        raise ValueError(f"palette entries must be RGB triples of 0..255, got {items!r}")
    return _check_palette(palette.astype(np.uint8))


def _check_palette(palette: np.ndarray) -> np.ndarray:
    """Validate a parsed palette: (K, 3) uint8 with 1..MAX_PALETTE_COLORS rows."""
    palette = np.asarray(palette)
    if palette.dtype != np.uint8 or palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must be a (K, 3) uint8 array, got {palette.dtype} {palette.shape}")
    if not 1 <= len(palette) <= MAX_PALETTE_COLORS:
        raise ValueError(f"palette needs 1..{MAX_PALETTE_COLORS} colours, got {len(palette)}")
    return palette


def is_grayscale_palette(palette: str | Sequence | np.ndarray) -> bool:
    """True when every palette colour has R == G == B (the map can be stored as a 1-channel PNG)."""
    pal = palette if isinstance(palette, np.ndarray) else parse_palette(palette)
    return bool(np.all((pal[:, 0] == pal[:, 1]) & (pal[:, 1] == pal[:, 2])))


def morton_key(color: Sequence[int]) -> int:
    """Position of a colour in IM's octree walk: per level from the top bit, child id b<<2 | g<<1 | r."""
    r, g, b = (int(c) for c in color)
    key = 0
    for bit in range(7, -1, -1):
        key = (key << 3) | ((r >> bit) & 1) | (((g >> bit) & 1) << 1) | (((b >> bit) & 1) << 2)
    return key


def tree_order(palette: np.ndarray) -> np.ndarray:
    """Distinct palette colours in IM's octree visiting order (ties then go to the last one).

    Called for every image with the run's one palette: the order is computed once per palette
    (a set and a Morton sort, ~25 us) and each call gets its own writable copy."""
    palette = np.asarray(palette)
    return np.array(_ordered(palette.tobytes(), palette.dtype.str, palette.shape), dtype=np.int32)


@functools.lru_cache(maxsize=16)
def _ordered(raw: bytes, dtype: str, shape: tuple) -> tuple:
    """tree_order's colours as a tuple of RGB triples, for one palette's bytes."""
    unique = {tuple(int(v) for v in c) for c in _check_palette(np.frombuffer(raw, dtype).reshape(shape))}
    return tuple(sorted(unique, key=morton_key))
