"""`python -m nydus_py.daemon` = `nydusd-py`."""

import sys

from .main import main

sys.exit(main())
