import sys

from tokentill.cli import main

sys.exit(main())
