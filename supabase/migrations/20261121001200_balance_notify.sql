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
-- Off by default, and free when off: NOTIFY makes every committing transaction that sent one
-- take a database-wide lock, in commit order, and deduct_tokens is the hot path. The trigger's
-- WHEN condition is evaluated before the function is even called, so unless the database (or
-- a session) sets `token_billing.notify_balance = 'on'` no notification is queued and commits
-- never touch that lock. Enable it where the stream is served:
--   alter database postgres set token_billing.notify_balance = 'on';

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
'service''s balance stream. Fires only when token_billing.notify_balance is on.';

revoke all on function billing.tg_accounts__notify_balance() from public;

create trigger tg_accounts__90_notify_balance
after insert or update of balance, reserved, plan, subscription_status on billing.accounts
for each row
when (pg_catalog.current_setting('token_billing.notify_balance', true) = 'on')
execute function billing.tg_accounts__notify_balance();
