"""The HTTP service (the `server` extra): `token_billing.server.app:create_app`."""
