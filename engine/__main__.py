"""`python -m engine ...`"""

import gc
import sys

from .prestart import start_early

start_early(sys.argv[1:])  # before the CLI's imports: the fork server's preload is the start's long pole
from .cli import main  # noqa: E402

code = main()
# The command is done (shards, stats and card written and closed). Exempting what is alive from the
# interpreter's last garbage collections saves 0.1-0.2 s of every command's wall time (~600 modules
# of numpy, pyarrow and Numba objects to traverse); atexit handlers and the std streams' flush still run.
gc.freeze()
sys.exit(code)
