"""`python -m engine ...`"""

import gc
import sys

from .cli import main

code = main()
# The command is done (shards, stats and card written and closed). Exempting what is alive from the
# interpreter's last garbage collections saves 0.1-0.2 s of every command's wall time (~600 modules
# of numpy, pyarrow and Numba objects to traverse); atexit handlers and the std streams' flush still run.
gc.freeze()
sys.exit(code)
