-- What the service's GET /readyz reads: public.installed_migrations(), the applied migrations
-- (its privileges are in 02-privileges.sql). Shape, then behaviour.
begin;
set local search_path = extensions, public;
select plan(6);

-- Shape ---------------------------------------------------------------------------------------
select has_function(
  'public', 'installed_migrations', array[]::text[],
  'public.installed_migrations should exist'
);
select is(
  (
    select p.prosecdef
    from pg_proc as p
    where p.oid = 'public.installed_migrations()'::regprocedure
  ),
  false,
  'installed_migrations should be security invoker'
);

-- Behaviour -----------------------------------------------------------------------------------
set local role service_role;
select results_eq(
  $$select version from public.installed_migrations()$$,
  $$select version from billing.schema_migrations order by version$$,
  'service_role should read every applied migration, oldest first'
);
select ok(
  exists (
    select 1 from public.installed_migrations()
    where version = '20261202300000' and name = 'installed_migrations'
  ),
  'the migration that adds the function should be listed by it'
);
select is(
  (
    select count(*)
    from public.installed_migrations()
    where applied_at is null
  ),
  0::bigint,
  'every applied migration should say when it was applied'
);
reset role;

set local role authenticated;
select throws_ok(
  $$select * from public.installed_migrations()$$,
  '42501', null, 'a signed-in user should not read the installed migrations'
);
reset role;

select * from finish();
rollback;
