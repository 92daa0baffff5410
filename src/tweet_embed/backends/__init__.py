"""Embedding backends: one protocol per module behind :class:`tweet_embed.backends.base.Backend`."""
