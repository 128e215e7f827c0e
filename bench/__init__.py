"""`make bench`: token-billing's hot paths against references measured in the same run."""
