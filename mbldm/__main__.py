"""``python -m mbldm`` (also ``accelerate launch -m mbldm``) behaves like the ``mbldm`` command."""
import sys

from mbldm.cli import main

if __name__ == "__main__":
    sys.exit(main())
