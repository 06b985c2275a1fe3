"""The web console: served by Strata itself at /console, every asset in this package (static/)."""
