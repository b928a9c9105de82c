"""`python -m engine ...`"""

import sys

from .prestart import start_early

start_early(sys.argv[1:])  # before the CLI's imports: the fork server's preload is the start's long pole
from .cli import entry  # noqa: E402

entry()
