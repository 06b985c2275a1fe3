"""Strata: a self-hosted, production-grade runtime for AI agents and the models behind them."""

__version__ = "0.1.0"
