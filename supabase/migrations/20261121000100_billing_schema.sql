-- Migration: the billing schema, its privilege baseline and the record of installed migrations.
--
-- Purpose: every piece of billing state lives in the private schema `billing`; the browser and
-- the Data API reach it only through the functions in `public` (RPCs) and through row-level
-- security on the few tables a signed-in user may read. billing.schema_migrations records each
-- token-billing migration applied (every migration ends by recording itself), whichever way it
-- was installed: `supabase db push` of this project, or the installer sql/token_billing.sql.
-- Objects: schema billing, billing.schema_migrations.
--
-- Errors raised by the token-billing functions (SQLSTATE, meaning):
--   22023  invalid argument: null, non-positive or oversized amount, null or empty or oversized
--          key, unknown kind, malformed Stripe event. The message names the argument.
--   TBKEY  idempotency key reused with different arguments. Nothing was written.
--   TBRES  reservation not found.
--   TBAPP  append-only violation: a ledger entry, or a resolved reservation, cannot be changed.
--   TBCUS  Stripe customer already linked to another user. Nothing was written.
--   22023  also: an idempotency key shaped like one token-billing makes for itself (signup:,
--          expiry:, reservation:, stripe:); the check constraint ledger_entries_valid
--          (23514) is the backstop for any other writer. Nothing was written.
--   22xxx  other data exceptions, raised by Postgres while reading an argument: 22P02 not a
--          uuid or not JSON, 22P05 \u0000 in JSON, 22007/22008 a timestamp or interval that is
--          malformed or out of range, 22003 a balance that would leave bigint.

-- A `billing` schema that token-billing did not create belongs to the host application: refuse
-- to adopt it (its grants would be changed below, and its tables would clash with ours).
do $preflight$
begin
  if exists (select 1 from pg_catalog.pg_namespace where nspname = 'billing') then
    raise exception using
      errcode = 'TBINS',
      message = format(
        'schema billing already exists and was not created by token-billing (it holds: %s)',
        coalesce((
          select string_agg(c.relname, ', ' order by c.relname)
          from pg_catalog.pg_class as c
          where c.relnamespace = 'billing'::regnamespace and c.relkind in ('r', 'v', 'm', 'p', 'f')
        ), 'no tables')),
      hint = 'token-billing keeps its state in a schema named billing: install it into a project '
        'whose own schema has another name.';
  end if;
end
$preflight$;

create schema billing;

comment on schema billing is
'token-billing state: accounts, ledger, credit buckets, reservations, catalog, Stripe records. '
'Private: not exposed through the Data API; written only by the token-billing functions.';

revoke all on schema billing from public;
grant usage on schema billing to authenticated, service_role;

-- Functions in billing are private helpers. PostgreSQL grants EXECUTE on every new function to
-- PUBLIC, and a per-schema default privilege cannot take that away (ALTER DEFAULT PRIVILEGES ...
-- IN SCHEMA only adds); changing the global defaults would change the host application's
-- functions too. So every migration revokes each function explicitly, right after creating it.

create table billing.schema_migrations (
  version text primary key,
  name text not null,
  applied_at timestamptz not null default now(),
  constraint schema_migrations_version_format check (version ~ '^[0-9]{14}$')
);

comment on table billing.schema_migrations is
'One row per token-billing migration applied to this database, written by the migration itself. '
'The installed version is the newest release all of whose migrations are here.';
comment on column billing.schema_migrations.version is 'The migration''s timestamp (its file name prefix).';
comment on column billing.schema_migrations.name is 'The migration''s name (its file name after the timestamp).';
comment on column billing.schema_migrations.applied_at is 'When it was applied.';

alter table billing.schema_migrations enable row level security;
-- No policy: service role only (the service's readiness check reads the installed version).
revoke all on billing.schema_migrations from public, anon, authenticated, service_role;
grant select on billing.schema_migrations to service_role;

insert into billing.schema_migrations (version, name) values ('20261121000100', 'billing_schema');
