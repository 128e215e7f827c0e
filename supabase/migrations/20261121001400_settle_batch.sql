-- Migration: settle many reservations in one call.
--
-- Purpose: a service that reserves around each model call can settle the finished calls in
-- bulk (a worker draining a queue), one round trip and one commit for up to 1,000 settlements
-- instead of one each. Each item is exactly public.settle_reservation: same statuses, same
-- exactly-once rule, same errors. The batch is one transaction: an invalid item, or an unknown
-- reservation (TBRES), refuses the whole batch and changes nothing.
-- Objects: public.settle_reservations().
--
-- Lock order: the items are settled ordered by account, then by reservation id, so batches
-- that touch the same accounts and reservations take their locks in one order and cannot
-- deadlock on each other. (Settling one reservation at the same time through
-- settle_reservation or release_reservation can still deadlock with a batch; Postgres then
-- aborts one of the two with 40P01, and its retry answers duplicate or not_pending.) The rows
-- come back in that order, each naming its reservation.

create function public.settle_reservations(p_settlements jsonb)
returns table (reservation_id uuid, status text, balance bigint, entry_id bigint)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_item record;
  v_bad record;
begin
  if p_settlements is null or jsonb_typeof(p_settlements) <> 'array' then
    raise exception using
      errcode = '22023',
      message = format(
        'p_settlements must be a JSON array of {"reservation_id", "amount"} objects, got %s',
        coalesce(jsonb_typeof(p_settlements), 'null'));
  end if;
  if jsonb_array_length(p_settlements) > 1000 then
    raise exception using
      errcode = '22023',
      message = format(
        'p_settlements takes at most 1000 items, got %s', jsonb_array_length(p_settlements));
  end if;

  -- Every item is checked before any is settled: the first bad one names its position.
  select i.position - 1 as idx, i.item
  into v_bad
  from jsonb_array_elements(p_settlements) with ordinality as i (item, position)
  where not (
    jsonb_typeof(i.item) = 'object'
    and jsonb_typeof(i.item -> 'reservation_id') = 'string'
    and (i.item ->> 'reservation_id')
    ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
    and jsonb_typeof(i.item -> 'amount') = 'number'
    and (i.item ->> 'amount') ~ '^[0-9]{1,16}$'
  )
  order by i.position
  limit 1;
  if found then
    raise exception using
      errcode = '22023',
      message = format(
        'p_settlements[%s] must be {"reservation_id": <uuid>, "amount": <positive integer>}, '
        'got %s', v_bad.idx, left(v_bad.item::text, 200));
  end if;

  for v_item in
    select s.id, s.amount
    from (
      select
        (i.item ->> 'reservation_id')::uuid as id,
        (i.item ->> 'amount')::bigint as amount,
        i.position
      from jsonb_array_elements(p_settlements) with ordinality as i (item, position)
    ) as s
    left join billing.reservations as r on s.id = r.id
    order by r.user_id, s.id, s.position
  loop
    return query
    select v_item.id, settled.status, settled.balance, settled.entry_id
    from public.settle_reservation(v_item.id, v_item.amount) as settled;
  end loop;
end;
$$;

comment on function public.settle_reservations(jsonb) is
'Settles many reservations in one transaction: p_settlements is a JSON array (at most 1000) of '
'{"reservation_id": uuid, "amount": positive integer}. Each item is settle_reservation '
'(statuses applied, partial, duplicate, not_pending); rows come back ordered by account, '
'then reservation id. '
'22023 for a malformed item and TBRES for an unknown reservation refuse the whole batch.';

revoke all on function public.settle_reservations(jsonb) from public, anon, authenticated;
grant execute on function public.settle_reservations(jsonb) to service_role;

insert into billing.schema_migrations (version, name) values ('20261121001400', 'settle_batch');
