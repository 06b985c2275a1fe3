"""Agents written as code (see README, Agents as code); `strata serve` imports them by `entrypoint`."""
