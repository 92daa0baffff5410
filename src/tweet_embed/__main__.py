import sys

from tweet_embed.cli import main

sys.exit(main())
