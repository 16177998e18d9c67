import sys

from lite.cli import main

sys.exit(main())
