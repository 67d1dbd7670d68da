"""``python -m mppm_ext.scan ARGS`` is ``mppm scan ARGS`` (the form ``torchrun -m`` needs)."""

import sys

from mppm_ext.scan.cli import main

if __name__ == "__main__":
    sys.exit(main(["scan", *sys.argv[1:]]))
