"""python -m quantize INPUT OUTPUT --type T  (the same as edgellama-quantize)."""

import sys

from .cli import main

sys.exit(main())
