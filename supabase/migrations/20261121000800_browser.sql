-- Migration: what the browser may call.
--
-- Purpose: a signed-in user reads the own balance. my_tokens() is security invoker: it reads
-- billing.accounts through the caller's RLS policy, so it can only ever return the caller's row.
-- Objects: public.my_tokens().

create function public.my_tokens()
returns table (
  balance bigint, available bigint, reserved bigint, plan text, subscription_status text
)
language sql stable
security invoker
set search_path = ''
as $$
  select a.balance, a.balance - a.reserved, a.reserved, a.plan, a.subscription_status
  from billing.accounts as a
  where a.user_id = (select auth.uid());
$$;

comment on function public.my_tokens() is
'The signed-in user''s balance, available tokens, reserved tokens, plan and subscription status. '
'Security invoker: reads through RLS, so no row for anyone else (or for anon).';

revoke all on function public.my_tokens() from public, anon, service_role;
grant execute on function public.my_tokens() to authenticated;

insert into billing.schema_migrations (version, name) values ('20261121000800', 'browser');
