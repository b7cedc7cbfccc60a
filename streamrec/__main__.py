"""``python -m streamrec``: the same command line as the ``streamrec`` script."""

import sys

from streamrec.serving.cli import main

sys.exit(main())
