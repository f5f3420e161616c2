"""``python -m batchllm_core``: the same command line as the ``batchllm`` console script."""
import sys

from .cli import main

sys.exit(main())
