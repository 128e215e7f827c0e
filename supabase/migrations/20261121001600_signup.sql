-- Migration: an account for every user, with the signup grant.
--
-- Purpose: every auth.users row gets a billing.accounts row the moment it is created, and users
-- that already exist when token-billing is installed get one too (backfill). The signup grant
-- (billing.settings.signup_grant, 100 unless chosen otherwise at install; 0 grants nothing) lands
-- as an ordinary ledger entry of kind signup, keyed `signup:<user_id>`, so it lands at most once,
-- never expiring. Anonymous users (Supabase anonymous sign-ins) get it only where
-- billing.settings.grant_anonymous_users says so; otherwise it lands when the user links an email
-- or phone and stops being anonymous. Users that existed before the install get it only where
-- billing.settings.grant_existing_users says so.
-- Objects: billing.grant_signup(), billing.open_account(), billing.open_missing_accounts(),
--   billing.tg_users__open_account(), billing.tg_users__grant_linked(), triggers tg_users__50_open_billing_account and
--   tg_users__51_grant_linked_billing_account on auth.users.
--
-- Last of the first release's migrations on purpose: creating a trigger locks auth.users against
-- signups until the installing transaction commits, so as little as possible comes after it
-- (the backfill runs before it, see below).
--
-- is_anonymous is read through to_jsonb(): Supabase has the column since 2024, an older
-- self-hosted auth schema may not, and a missing column must mean "not anonymous", not an error.

create function billing.grant_signup(p_user_id uuid, p_is_anonymous boolean) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_settings billing.settings;
begin
  if exists (
    select 1 from billing.ledger_entries as e where e.idempotency_key = 'signup:' || p_user_id::text
  ) then
    return;
  end if;
  select * into v_settings from billing.settings;
  if coalesce(v_settings.signup_grant, 0) = 0
    or (p_is_anonymous and not v_settings.grant_anonymous_users) then
    return;
  end if;
  perform billing.credit(
    p_user_id, v_settings.signup_grant, 'signup:' || p_user_id::text, 'signup', 'Signup grant');
end;
$$;

comment on function billing.grant_signup(uuid, boolean) is
'Credits the signup grant once (key signup:<user_id>) unless it is 0, or the user is anonymous '
'and anonymous users get none. A second call changes nothing. Call only when the account exists.';

revoke all on function billing.grant_signup(uuid, boolean) from public;

create function billing.open_account(p_user_id uuid) returns void
language plpgsql
set search_path = ''
as $$
begin
  insert into billing.accounts (user_id) values (p_user_id)
  on conflict (user_id) do nothing;

  perform billing.grant_signup(
    p_user_id,
    coalesce((
      select (to_jsonb(u) ->> 'is_anonymous')::boolean from auth.users as u where u.id = p_user_id
    ), false)
  );
end;
$$;

comment on function billing.open_account(uuid) is
'Opens the user''s account (if missing) and credits the signup grant once (billing.grant_signup). '
'Safe to call again: it changes nothing the second time.';

revoke all on function billing.open_account(uuid) from public;

create function billing.tg_users__open_account() returns trigger
language plpgsql
-- Definer: auth.users is written by the auth server's role, which has no rights on billing.
security definer
set search_path = ''
as $$
begin
  insert into billing.accounts (user_id) values (new.id)
  on conflict (user_id) do nothing;
  perform billing.grant_signup(new.id, coalesce((to_jsonb(new) ->> 'is_anonymous')::boolean, false));
  return null;
end;
$$;

comment on function billing.tg_users__open_account() is
'Trigger on auth.users: opens the billing account of every new user with the signup grant '
'(none yet for an anonymous user, unless billing.settings.grant_anonymous_users).';

revoke all on function billing.tg_users__open_account() from public, anon, authenticated;

create function billing.tg_users__grant_linked() returns trigger
language plpgsql
-- Definer: auth.users is written by the auth server's role, which has no rights on billing.
security definer
set search_path = ''
as $$
begin
  -- An update of auth.users locks its row, so concurrent updates of one user run one after the
  -- other; and the grant's key makes a second grant a duplicate whatever the timing.
  perform billing.open_account(new.id);
  return null;
end;
$$;

comment on function billing.tg_users__grant_linked() is
'Trigger on auth.users: when an anonymous user links an email or phone (is_anonymous turns '
'false), credits the signup grant they did not get at signup, once.';

revoke all on function billing.tg_users__grant_linked() from public, anon, authenticated;

-- Users without an account (those that existed before token-billing was installed), set-based:
-- a project may have many, and the anti-join and inserts below are one pass each.
create function billing.open_missing_accounts() returns bigint
language plpgsql
set search_path = ''
as $$
declare
  v_settings billing.settings;
  v_opened bigint;
begin
  select * into v_settings from billing.settings;

  -- A user created since this transaction began signed up during the install: they get the grant
  -- as any signup does. Older users get it where grant_existing_users says so. The account is
  -- inserted with its balance, its entry and bucket in the same statement.
  with missing as (
    select
      u.id,
      coalesce((to_jsonb(u) ->> 'is_anonymous')::boolean, false) as is_anonymous,
      u.created_at >= now() as signed_up_now
    from auth.users as u
    where not exists (select 1 from billing.accounts as a where a.user_id = u.id)
  ),

  opened as (
    insert into billing.accounts (user_id, balance)
    select
      m.id,
      case
        when (m.signed_up_now or v_settings.grant_existing_users)
          and (v_settings.grant_anonymous_users or not m.is_anonymous)
          then v_settings.signup_grant
        else 0
      end
    from missing as m
    on conflict (user_id) do nothing
    returning user_id, balance
  ),

  entries as (
    insert into billing.ledger_entries (
      user_id, amount, balance_after, kind, idempotency_key, description
    )
    select o.user_id, o.balance, o.balance, 'signup', 'signup:' || o.user_id::text, 'Signup grant'
    from opened as o
    where o.balance > 0
    returning id, user_id, amount
  ),

  buckets as (
    insert into billing.credit_buckets (user_id, entry_id, amount, remaining)
    select e.user_id, e.id, e.amount, e.amount
    from entries as e
    returning id
  )

  select count(*) into v_opened from opened;
  return v_opened;
end;
$$;

comment on function billing.open_missing_accounts() is
'Opens an account for every auth.users row without one, with the signup grant (key '
'signup:<user_id>) for users created since the calling transaction began and, where '
'billing.settings.grant_existing_users says so, for older ones; anonymous users as '
'grant_anonymous_users says. Returns how many accounts it opened. Safe to run again.';

revoke all on function billing.open_missing_accounts() from public;

-- The backfill runs before the triggers exist: creating a trigger locks auth.users against
-- signups until the install commits, and with many users the backfill is the slow part. Once the
-- triggers exist (and the lock is held) a second pass opens the accounts of users who signed up
-- meanwhile; every later signup fires the trigger.
select billing.open_missing_accounts();

create trigger tg_users__50_open_billing_account
after insert on auth.users
for each row execute function billing.tg_users__open_account();

do $linked$
begin
  if exists (
    select 1 from pg_catalog.pg_attribute
    where attrelid = 'auth.users'::regclass and attname = 'is_anonymous' and not attisdropped
  ) then
    create trigger tg_users__51_grant_linked_billing_account
    after update of is_anonymous on auth.users
    for each row
    when (old.is_anonymous and not new.is_anonymous)
    execute function billing.tg_users__grant_linked();
  end if;
end
$linked$;

select billing.open_missing_accounts();

insert into billing.schema_migrations (version, name) values ('20261121001600', 'signup');
