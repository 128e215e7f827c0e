"""token-billing: the HTTP service and Python client."""
