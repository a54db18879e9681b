import sys

from rewardtune.cli import main

sys.exit(main())
