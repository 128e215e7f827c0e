-- Migration: API keys with scopes, for agent backends calling the service without a user's JWT.
--
-- Purpose: a user's key (tb_live_... or tb_test_...) authenticates the service's usage routes
-- as that user, limited to its scopes. The secret is returned once by create_api_key and never
-- stored: only its SHA-256 and a lookup prefix are. A fast hash is right here: the secret is 244
-- random bits (gen_random_uuid twice, less the version bits), so nobody can guess it or search
-- for it, hashed or not; slow password hashes (bcrypt, argon2) exist to slow the search through
-- the small space of human passwords, and would only add milliseconds to every request.
-- Revocation is immediate (every request looks the key up); last_used_at is written at most
-- once a minute per key (touch_api_key), never on every request.
-- Objects: billing.api_keys, public.create_api_key(), public.list_api_keys(),
--   public.revoke_api_key(), public.authenticate_api_key(), public.touch_api_key().

create table billing.api_keys (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references billing.accounts (user_id),
  name text,
  lookup text not null,
  secret_sha256 bytea not null,
  scopes text[] not null,
  environment text not null,
  created_at timestamptz not null default now(),
  expires_at timestamptz,
  revoked_at timestamptz,
  last_used_at timestamptz,
  constraint api_keys_lookup_unique unique (lookup),
  constraint api_keys_lookup_format check (lookup ~ '^tb_(live|test)_[0-9a-f]{12}$'),
  constraint api_keys_sha256_length check (length(secret_sha256) = 32),
  constraint api_keys_scopes_known check (
    cardinality(scopes) between 1 and 8
    and scopes <@ array['usage:read', 'usage:write', 'balance:read']::text[]
  ),
  constraint api_keys_environment_known check (environment in ('live', 'test')),
  constraint api_keys_name_length check (length(name) between 1 and 100)
);

create index api_keys_user_id_idx on billing.api_keys (user_id, created_at desc);

comment on table billing.api_keys is
'A user''s API keys: the lookup prefix and SHA-256 of each secret (never the secret), its '
'scopes and expiry. Revoked or expired keys authenticate nothing.';
comment on column billing.api_keys.id is 'Key id (DELETE /v1/api-keys/{id}).';
comment on column billing.api_keys.user_id is 'The user the key acts as.';
comment on column billing.api_keys.name is 'The owner''s label.';
comment on column billing.api_keys.lookup is
'The key''s first 20 characters (tb_live_ + 12 hex): not secret, finds the row, shown in lists.';
comment on column billing.api_keys.secret_sha256 is 'SHA-256 of the whole key (UTF-8).';
comment on column billing.api_keys.scopes is 'usage:read, usage:write, balance:read.';
comment on column billing.api_keys.environment is
'live or test: the service accepts only the keys of its own Stripe mode.';
comment on column billing.api_keys.created_at is 'When the key was made.';
comment on column billing.api_keys.expires_at is 'After this it authenticates nothing; null: never.';
comment on column billing.api_keys.revoked_at is 'When it was revoked; revocation is immediate.';
comment on column billing.api_keys.last_used_at is
'The last use, up to a minute stale (written at most once a minute).';

alter table billing.api_keys enable row level security;
-- No policy: service role only (the service manages a signed-in user's keys for them).
revoke all on billing.api_keys from public, anon, authenticated, service_role;
grant select on billing.api_keys to service_role;

create function public.create_api_key(
  p_user_id uuid,
  p_name text default null,
  p_scopes text[] default null,
  p_expires_at timestamptz default null,
  p_environment text default 'live'
) returns table (
  status text, api_key_id uuid, api_key text, lookup text, scopes text[], expires_at timestamptz
)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_secret text;
  v_key text;
begin
  -- Null: every scope.
  p_scopes := coalesce(p_scopes, array['usage:read', 'usage:write', 'balance:read']);
  if cardinality(p_scopes) = 0
    or not p_scopes <@ array['usage:read', 'usage:write', 'balance:read']::text[] then
    raise exception using
      errcode = '22023',
      message = 'p_scopes must be a non-empty subset of usage:read, usage:write, balance:read';
  end if;
  if p_environment is null or p_environment not in ('live', 'test') then
    raise exception using errcode = '22023', message = 'p_environment must be live or test';
  end if;
  if p_name is not null and length(p_name) not between 1 and 100 then
    raise exception using errcode = '22023', message = 'p_name must be 1 to 100 characters';
  end if;
  if p_expires_at is not null and p_expires_at <= now() then
    raise exception using errcode = '22023', message = 'p_expires_at must be in the future';
  end if;
  if not exists (select 1 from billing.accounts as a where a.user_id = p_user_id) then
    return query select 'unknown_account'::text, null::uuid, null::text, null::text, null::text[],
      null::timestamptz;
    return;
  end if;
  if (
    select count(*) from billing.api_keys as k
    where k.user_id = p_user_id and k.revoked_at is null and (k.expires_at is null or k.expires_at > now())
  ) >= 50 then
    raise exception using
      errcode = '22023', message = format('user %s has 50 live API keys: revoke one first', p_user_id);
  end if;
  v_secret := replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
  v_key := 'tb_' || p_environment || '_' || v_secret;
  return query
  insert into billing.api_keys (user_id, name, lookup, secret_sha256, scopes, environment, expires_at)
  values (
    p_user_id, p_name, left(v_key, 20), sha256(convert_to(v_key, 'UTF8')),
    array(select distinct s from unnest(p_scopes) as s order by s), p_environment, p_expires_at
  )
  returning 'applied'::text, id, v_key, api_keys.lookup, api_keys.scopes, api_keys.expires_at;
end;
$$;

comment on function public.create_api_key(uuid, text, text[], timestamptz, text) is
'Makes a key for a user and returns it, the only time it is ever shown (only its SHA-256 is '
'stored). Statuses: applied, unknown_account. 22023 on bad scopes, environment, name, expiry, '
'or a 51st live key.';

revoke all on function public.create_api_key(uuid, text, text[], timestamptz, text) from public, anon, authenticated;
grant execute on function public.create_api_key(uuid, text, text[], timestamptz, text) to service_role;

create function public.list_api_keys(p_user_id uuid)
returns table (
  api_key_id uuid, name text, lookup text, scopes text[], environment text,
  created_at timestamptz, expires_at timestamptz, revoked_at timestamptz, last_used_at timestamptz
)
language sql stable
security invoker
set search_path = ''
as $$
  select k.id, k.name, k.lookup, k.scopes, k.environment, k.created_at, k.expires_at,
    k.revoked_at, k.last_used_at
  from billing.api_keys as k
  where k.user_id = p_user_id
  order by k.created_at desc, k.id
$$;

comment on function public.list_api_keys(uuid) is
'A user''s keys, newest first, without any secret or hash. Security invoker: service_role '
'reads billing.api_keys itself.';

revoke all on function public.list_api_keys(uuid) from public, anon, authenticated;
grant execute on function public.list_api_keys(uuid) to service_role;

create function public.revoke_api_key(p_user_id uuid, p_api_key_id uuid)
returns table (status text, revoked_at timestamptz)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
begin
  return query
  update billing.api_keys as k
  set revoked_at = now()
  where k.id = p_api_key_id and k.user_id = p_user_id and k.revoked_at is null
  returning 'applied'::text, k.revoked_at;
  if found then
    return;
  end if;
  return query
  select 'duplicate'::text, k.revoked_at
  from billing.api_keys as k
  where k.id = p_api_key_id and k.user_id = p_user_id;
  if not found then
    return query select 'not_found'::text, null::timestamptz;
  end if;
end;
$$;

comment on function public.revoke_api_key(uuid, uuid) is
'Revokes one of a user''s keys at once. Statuses: applied, duplicate (already revoked), '
'not_found (no such key of this user: another user''s key is not found either).';

revoke all on function public.revoke_api_key(uuid, uuid) from public, anon, authenticated;
grant execute on function public.revoke_api_key(uuid, uuid) to service_role;

create function public.authenticate_api_key(p_lookup text, p_as_of timestamptz default now())
returns table (
  api_key_id uuid, user_id uuid, secret_sha256 bytea, scopes text[], environment text,
  status text, last_used_at timestamptz
)
language sql stable
security invoker
set search_path = ''
as $$
  select k.id, k.user_id, k.secret_sha256, k.scopes, k.environment,
    case
      when k.revoked_at is not null then 'revoked'
      when k.expires_at <= p_as_of then 'expired'
      else 'valid'
    end,
    k.last_used_at
  from billing.api_keys as k
  where k.lookup = p_lookup
$$;

comment on function public.authenticate_api_key(text, timestamptz) is
'The key a lookup prefix names, with the SHA-256 the caller compares (in constant time) with '
'the hash of the key presented, and its status at p_as_of: valid, revoked or expired. No row: '
'no such key. Reads only: one index lookup per request, so revocation is immediate.';

revoke all on function public.authenticate_api_key(text, timestamptz) from public, anon, authenticated;
grant execute on function public.authenticate_api_key(text, timestamptz) to service_role;

create function public.touch_api_key(p_api_key_id uuid)
returns table (last_used_at timestamptz)
language sql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
  update billing.api_keys as k
  set last_used_at = now()
  where k.id = p_api_key_id and (k.last_used_at is null or k.last_used_at < now() - interval '1 minute')
  returning k.last_used_at
$$;

comment on function public.touch_api_key(uuid) is
'Records a use of a key, unless one was recorded less than a minute ago (then no row): the '
'service calls it at most once a minute per key, so last_used_at is at most a minute stale.';

revoke all on function public.touch_api_key(uuid) from public, anon, authenticated;
grant execute on function public.touch_api_key(uuid) to service_role;

insert into billing.schema_migrations (version, name) values ('20261202500200', 'api_keys');
