"""Reports: an example application on both tiers (see ``README.md`` beside this file)."""
