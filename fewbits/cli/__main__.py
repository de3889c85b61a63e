"""``python -m fewbits.cli ...`` = ``fewbits ...``."""

import sys

from . import main

sys.exit(main())
