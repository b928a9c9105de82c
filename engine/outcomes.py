"""Every input row ends with exactly one outcome; these are their names and meanings.

The per-row parquet, the per-shard stats and the run's stats.json all use these names, so a user
can group by them. "ok" is the only outcome that writes a sample.
"""

OK = "ok"
# before any download (plan stage, metadata only)
INVALID_URL = "invalid_url"              # null, empty, not http(s), unparsable
# before any request (IP literals at plan time; names after DNS, at connection time; every redirect hop)
BLOCKED_ADDRESS = "blocked_address"      # host is or resolves to a non-public address; never retried
FILTERED_SIZE = "filtered_size"          # parquet WIDTH/HEIGHT below --min-image-size
FILTERED_ASPECT = "filtered_aspect"      # parquet WIDTH/HEIGHT beyond --max-aspect-ratio
# fetch stage
HTTP_ERROR = "http_error"                # 4xx/5xx after retries (reason holds the status)
TIMEOUT = "timeout"                      # connect or total timeout, slow drip included
CONNECTION_ERROR = "connection_error"    # refused, reset, DNS, TLS (reason "TLS: ..."), unparsable responses
INCOMPLETE_BODY = "incomplete_body"      # connection closed before Content-Length bytes arrived
TOO_LARGE = "too_large"                  # body beyond --max-bytes, on the wire or decoded (gzip, deflate)
REDIRECT_ERROR = "redirect_error"        # loop, too many hops, a non-http(s) or malformed target
OPTED_OUT = "opted_out"                  # X-Robots-Tag noai / noimageai
# decode stage
NOT_AN_IMAGE = "not_an_image"            # HTML, SVG, text, empty body
UNSUPPORTED_FORMAT = "unsupported_format"  # bytes of a format outside the allowlist (engine/imagepolicy.py):
                                         # PostScript/EPS, PDF, AVIF, ICO, ... or unknown; never decoded
DECODE_ERROR = "decode_error"            # truncated or corrupt image data
DECOMPRESSION_BOMB = "decompression_bomb"  # more pixels than --max-pixels
TOO_SMALL = "too_small"                  # decoded shorter side below --min-image-size
BAD_ASPECT = "bad_aspect"                # decoded aspect ratio beyond --max-aspect-ratio
# anything a stage did not foresee; the reason column holds the exception
ERROR = "error"

# BLOCKED_ADDRESS is left out: it is the policy's, and the loopback sample corpus never meets it.
FETCH_OUTCOMES = (HTTP_ERROR, TIMEOUT, CONNECTION_ERROR, INCOMPLETE_BODY, TOO_LARGE, REDIRECT_ERROR, OPTED_OUT)
DECODE_OUTCOMES = (NOT_AN_IMAGE, UNSUPPORTED_FORMAT, DECODE_ERROR, DECOMPRESSION_BOMB, TOO_SMALL, BAD_ASPECT)

# optional filters (engine/config.py FilterConfig), each off by default
FILTERED_PUNSAFE = "filtered_punsafe"        # parquet punsafe above --max-punsafe
FILTERED_WATERMARK = "filtered_watermark"    # parquet pwatermark above --max-pwatermark
FILTERED_AESTHETIC = "filtered_aesthetic"    # parquet aesthetic score below --min-aesthetic
FILTERED_SIMILARITY = "filtered_similarity"  # parquet CLIP similarity below --min-similarity
LOW_COLOR = "low_color"                      # decoded colourfulness below --min-colorfulness
EMPTY_CAPTION = "empty_caption"              # caption empty after cleaning, with --drop-empty-captions
# dedup (engine/dedup.py), across every shard of the run
DUPLICATE_EXACT = "duplicate_exact"          # same bytes or same decoded pixels as a kept image
DUPLICATE_NEAR = "duplicate_near"            # perceptual hash within --near-distance of a kept image
# the dedup index's verdict (engine/dedup.py Verdict.status): the two above, or this one, which is no
# outcome of its own: the image is kept and its row goes on to "ok"
NEW = "new"
