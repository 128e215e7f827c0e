-- supabase_compat.sql: what a plain PostgreSQL 15 lacks to behave like a hosted Supabase
-- database for the token-billing migrations. Local development and the tests only; never run
-- this against a real Supabase project (it already has all of it).
--
-- Run as a superuser, once per database (roles are cluster-wide, the rest is per database).
-- Idempotent: running it twice changes nothing.
--
-- What it reproduces, faithfully, including the traps:
--   * roles: supabase_admin (superuser), postgres (NOT a superuser: createrole, createdb,
--     replication, bypassrls, as on hosted Supabase since 2023), anon, authenticated,
--     service_role (bypassrls), authenticator (login, noinherit, may switch to the API roles),
--     supabase_auth_admin (owns the auth schema);
--   * schema auth with auth.users, auth.uid(), auth.role(), auth.jwt(), reading the
--     request.jwt.claims GUC that PostgREST and Realtime set (and the older
--     request.jwt.claim.sub / request.jwt.claim.role);
--   * schema extensions (pgcrypto, uuid-ossp);
--   * Supabase's default privileges on public: every table, sequence and FUNCTION that postgres
--     or supabase_admin creates there is granted to anon, authenticated and service_role. This is
--     the trap: a security definer function in public is callable by anyone with the anon key
--     unless its migration revokes execute explicitly. The tests must catch it, so it stays here;
--   * the supabase_realtime publication, owned by postgres, created only if missing.

set client_min_messages = warning;

-- Roles -------------------------------------------------------------------------------------
do $roles$
begin
  if not exists (select 1 from pg_roles where rolname = 'supabase_admin') then
    create role supabase_admin login superuser createdb createrole replication bypassrls;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'postgres') then
    create role postgres login;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit bypassrls;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticator') then
    create role authenticator login noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'supabase_auth_admin') then
    create role supabase_auth_admin login noinherit createrole;
  end if;
end
$roles$;

-- Hosted Supabase demoted postgres from superuser; migrations run as this role there.
alter role postgres with login nosuperuser createrole createdb replication bypassrls;
-- As on hosted Supabase: extensions (pgtap, plpgsql_check) resolve without qualification.
alter role postgres set search_path to "$user", public, extensions;

grant anon to authenticator;
grant authenticated to authenticator;
grant service_role to authenticator;
grant anon to postgres;
grant authenticated to postgres;
grant service_role to postgres;

alter role anon set statement_timeout = '3s';
alter role authenticated set statement_timeout = '8s';
alter role authenticator set statement_timeout = '8s';

-- This database ------------------------------------------------------------------------------
do $db$
begin
  execute format('grant all on database %I to postgres', current_database());
end
$db$;

grant usage, create on schema public to postgres;
grant usage on schema public to anon, authenticated, service_role;

-- Extensions live in their own schema on Supabase.
create schema if not exists extensions;
grant usage on schema extensions to postgres, anon, authenticated, service_role;
create extension if not exists pgcrypto with schema extensions;
create extension if not exists "uuid-ossp" with schema extensions;

-- The default privileges that make everything in public reachable through the Data API.
alter default privileges for role postgres in schema public
grant all on tables to postgres, anon, authenticated, service_role;
alter default privileges for role postgres in schema public
grant all on sequences to postgres, anon, authenticated, service_role;
alter default privileges for role postgres in schema public
grant all on functions to postgres, anon, authenticated, service_role;
alter default privileges for role supabase_admin in schema public
grant all on tables to postgres, anon, authenticated, service_role;
alter default privileges for role supabase_admin in schema public
grant all on sequences to postgres, anon, authenticated, service_role;
alter default privileges for role supabase_admin in schema public
grant all on functions to postgres, anon, authenticated, service_role;

-- auth: a faithful subset of GoTrue's schema -------------------------------------------------
create schema if not exists auth authorization supabase_auth_admin;
grant usage on schema auth to postgres, anon, authenticated, service_role;

create table if not exists auth.users (
  instance_id uuid,
  id uuid primary key,
  aud varchar(255),
  role varchar(255),
  email varchar(255),
  encrypted_password varchar(255),
  email_confirmed_at timestamptz,
  last_sign_in_at timestamptz,
  raw_app_meta_data jsonb,
  raw_user_meta_data jsonb,
  is_super_admin boolean,
  is_anonymous boolean not null default false,
  phone text unique,
  created_at timestamptz default now(),
  updated_at timestamptz default now(),
  deleted_at timestamptz
);
alter table auth.users owner to supabase_auth_admin;
-- On hosted Supabase the postgres role may read auth.users and attach triggers to it.
grant all on auth.users to postgres;
grant select on auth.users to service_role;

create or replace function auth.uid() returns uuid
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;

create or replace function auth.role() returns text
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;

create or replace function auth.jwt() returns jsonb
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;

alter function auth.uid() owner to supabase_auth_admin;
alter function auth.role() owner to supabase_auth_admin;
alter function auth.jwt() owner to supabase_auth_admin;
grant execute on function auth.uid(), auth.role(), auth.jwt()
to postgres, anon, authenticated, service_role;

-- Realtime: the publication belongs to the platform; migrations only add tables to it. -------
do $publication$
begin
  if not exists (select 1 from pg_publication where pubname = 'supabase_realtime') then
    create publication supabase_realtime;
  end if;
end
$publication$;
alter publication supabase_realtime owner to postgres;
