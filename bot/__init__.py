"""The Discord side of the MusicGen bot: settings, durable jobs, a fair queue and one MLX worker thread.

The engine modules (:mod:`bot.settings`, :mod:`bot.jobs`, :mod:`bot.store`, :mod:`bot.queue`,
:mod:`bot.worker`) do not import discord.py, so they can be used and tested without a gateway.
"""
