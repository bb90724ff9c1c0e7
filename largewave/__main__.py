"""``python -m largewave …`` is the ``largewave`` command."""
import sys

from largewave.cli import main

sys.exit(main())
