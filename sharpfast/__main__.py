"""``python -m sharpfast ...``: the same as the ``sharpfast`` console command."""
import sys

from .study.cli import main

sys.exit(main())
