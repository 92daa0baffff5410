"""Engines: how chunks are scheduled (local asyncio loop, one process per device, Ray)."""
