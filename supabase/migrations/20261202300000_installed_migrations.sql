-- Migration: the installed schema version, readable over both database paths.
--
-- Purpose: the service's GET /readyz answers ready only when every migration its package
-- expects is applied (token_billing.install.expected_migrations()), so a database that was
-- never migrated, or is behind the service, is reported instead of failing request by request.
-- billing.schema_migrations is not exposed through PostgREST, so the service reads it through
-- this function, as service_role, over DATABASE_URL and over PostgREST alike.
-- Objects: public.installed_migrations().

create function public.installed_migrations()
returns table (version text, name text, applied_at timestamptz)
language sql stable
security invoker
set search_path = ''
as $$
  select m.version, m.name, m.applied_at
  from billing.schema_migrations as m
  order by m.version;
$$;

comment on function public.installed_migrations() is
'Every token-billing migration applied to this database (billing.schema_migrations), oldest '
'first: what the service''s readiness check compares with the migrations its package expects. '
'Security invoker: service_role may read billing.schema_migrations itself.';

revoke all on function public.installed_migrations() from public, anon, authenticated;
grant execute on function public.installed_migrations() to service_role;

insert into billing.schema_migrations (version, name) values ('20261202300000', 'installed_migrations');
