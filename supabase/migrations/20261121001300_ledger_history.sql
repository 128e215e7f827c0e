-- Migration: a user's recent ledger entries, for the service's GET /v1/ledger.
--
-- Purpose: the page shows the last few balance changes. The service reads them as service_role
-- (through PostgREST too, where the billing schema is not exposed), for the user id it verified
-- from the access token. Descriptions and kinds only: metadata (Stripe ids, request ids) and
-- idempotency keys stay server-side.
-- Objects: public.list_ledger_entries().

create function public.list_ledger_entries(p_user_id uuid, p_limit integer default 20)
returns table (
  id bigint,
  amount bigint,
  balance_after bigint,
  kind text,
  description text,
  created_at timestamptz
)
language plpgsql stable
security invoker
set search_path = ''
as $$
begin
  if p_user_id is null then
    raise exception using errcode = '22023', message = 'p_user_id must not be null';
  end if;
  if p_limit is null or p_limit not between 1 and 100 then
    raise exception using
      errcode = '22023',
      message = format('p_limit must be between 1 and 100, got %s', coalesce(p_limit::text, 'null'));
  end if;

  -- Newest first, through ledger_entries_user_id_id_idx.
  return query
  select e.id, e.amount, e.balance_after, e.kind, e.description, e.created_at
  from billing.ledger_entries as e
  where e.user_id = p_user_id
  order by e.id desc
  limit p_limit;
end;
$$;

comment on function public.list_ledger_entries(uuid, integer) is
'The user''s last p_limit (1 to 100, default 20) ledger entries, newest first: amount, balance '
'after, kind, description, time. Security invoker: service_role reads the ledger itself. 22023 '
'on a null user or a limit out of range.';

revoke all on function public.list_ledger_entries(uuid, integer) from public, anon, authenticated;
grant execute on function public.list_ledger_entries(uuid, integer) to service_role;

insert into billing.schema_migrations (version, name) values ('20261121001300', 'ledger_history');
