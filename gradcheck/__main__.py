"""``python -m gradcheck``: the ``gradcheck`` command (see :mod:`gradcheck.cli`)."""

import sys

from gradcheck.cli import main

if __name__ == "__main__":
    sys.exit(main())
