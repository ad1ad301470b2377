import sys

from fastmtt.cli import main

sys.exit(main())
