"""Developer tooling: the local Postgres cluster, the SQL bundle, `make dev`."""
