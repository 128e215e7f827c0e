"""The service's routes, one module per resource; `token_billing.server.app` lists them."""
