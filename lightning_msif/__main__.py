"""``python -m lightning_msif`` is the ``msif`` command."""
import sys

from .cli import main

sys.exit(main())
