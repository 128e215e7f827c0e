-- Migration: balance change notifications for deployments without Supabase Realtime.
--
-- Purpose: on Supabase, Realtime streams billing.accounts to the browser (the supabase_realtime
-- publication). A self-hosted Postgres or the local `make dev` stack has no Realtime, so the
-- service's GET /v1/balance/stream listens on the channel `token_billing_balance` instead, and
-- this trigger announces which user's account changed. The payload is the user id alone: the
-- service reads the row itself (as service_role), so no balance travels on a shared channel and
-- the payload stays far below pg_notify's 8000-byte limit.
-- Objects: billing.tg_accounts__notify_balance(), trigger tg_accounts__90_notify_balance.
--
-- Off by default, and free when off: the trigger exists only while it is turned on. NOTIFY
-- makes every committing transaction that sent one take a database-wide lock, in commit order,
-- and deduct_tokens is the hot path. Even a trigger that never fires costs every debit: its WHEN
-- condition is parsed per statement and the after-row trigger machinery runs per row (see
-- bench/results/ for the measurement). Turn it on where the stream is served, as the owner of
-- billing.accounts (postgres):
--   select billing.set_balance_notify(true);

create function billing.tg_accounts__notify_balance() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  -- Identical payloads in one transaction are folded into one notification by Postgres.
  perform pg_catalog.pg_notify('token_billing_balance', new.user_id::text);
  return null;
end;
$$;

comment on function billing.tg_accounts__notify_balance() is
'Trigger: notifies channel token_billing_balance with the user id of a changed account, for the '
'service''s balance stream. Installed by billing.set_balance_notify(true).';

revoke all on function billing.tg_accounts__notify_balance() from public;

create function billing.set_balance_notify(p_enabled boolean) returns boolean
language plpgsql
set search_path = ''
as $$
begin
  if p_enabled then
    create or replace trigger tg_accounts__90_notify_balance
    after insert or update of balance, reserved, plan, subscription_status on billing.accounts
    for each row
    execute function billing.tg_accounts__notify_balance();
  else
    drop trigger if exists tg_accounts__90_notify_balance on billing.accounts;
  end if;
  return p_enabled;
end;
$$;

comment on function billing.set_balance_notify(boolean) is
'Installs (true) or drops (false) the trigger that notifies token_billing_balance when an '
'account changes; returns the new state. For the owner of billing.accounts: the service''s '
'GET /v1/balance/stream needs it on, Supabase Realtime does not.';

revoke all on function billing.set_balance_notify(boolean) from public;

insert into billing.schema_migrations (version, name) values ('20261121001200', 'balance_notify');
