-- Migration: an account for every user, with the signup grant.
--
-- Purpose: every auth.users row gets a billing.accounts row the moment it is created, and users
-- that already exist when this migration runs get one too (backfill). The signup grant is the
-- `free` plan's tokens (billing.products, 100 by default; set them to 0 to grant nothing) and
-- lands as an ordinary ledger entry of kind signup, keyed `signup:<user_id>`, never expiring.
-- Objects: billing.open_account(), billing.tg_users__open_account(), trigger on auth.users.

create function billing.open_account(p_user_id uuid) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_grant bigint;
begin
  insert into billing.accounts (user_id) values (p_user_id)
  on conflict (user_id) do nothing;

  select p.tokens into v_grant
  from billing.products as p
  where p.code = 'free' and p.active;

  if coalesce(v_grant, 0) > 0 then
    perform billing.credit(
      p_user_id, v_grant, 'signup:' || p_user_id::text, 'signup', 'Signup grant (free plan)');
  end if;
end;
$$;

comment on function billing.open_account(uuid) is
'Opens the user''s account (if missing) and credits the free plan''s tokens once, keyed '
'signup:<user_id>. Safe to call again: it changes nothing the second time.';

revoke all on function billing.open_account(uuid) from public;

create function billing.tg_users__open_account() returns trigger
language plpgsql
-- Definer: auth.users is written by the auth server's role, which has no rights on billing.
security definer
set search_path = ''
as $$
begin
  perform billing.open_account(new.id);
  return null;
end;
$$;

comment on function billing.tg_users__open_account() is
'Trigger on auth.users: opens the billing account of every new user with the signup grant.';

revoke all on function billing.tg_users__open_account() from public, anon, authenticated;

create trigger tg_users__50_open_billing_account
after insert on auth.users
for each row execute function billing.tg_users__open_account();

-- Backfill: users that existed before token-billing was installed.
do $backfill$
declare
  v_user_id uuid;
begin
  for v_user_id in
    select u.id
    from auth.users as u
    where not exists (select 1 from billing.accounts as a where a.user_id = u.id)
    order by u.id
  loop
    perform billing.open_account(v_user_id);
  end loop;
end
$backfill$;
