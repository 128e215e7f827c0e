-- Migration: the holds' path without a function-backed CHECK, and settle_reservations by id.
--
-- Purpose: every reserve inserts into billing.reservations and every settle, release and expiry
-- updates it. Its CHECK called a plpgsql function (billing.reservation_is_valid): a function
-- call and a search_path switch per row, as the accounts and ledger CHECKs did before
-- 20261202400000_plain_checks.sql. It becomes one plain CHECK with the same rules: a positive
-- amount, a key of 1..255 characters, and a status consistent with its resolution (pending:
-- unresolved; settled: resolved with a settle_amount of 0 or more; released or expired: resolved
-- without one). The status rule names every status, so the CHECK also keeps the status known;
-- a foreign key to a lookup table would add a referential query to every reserve and settle
-- (the status changes on each), which the CHECK does not.
-- settle_reservations ordered its items by account through a join the planner ran as a
-- sequential scan of billing.reservations (bench/results/history.md, issue 15): each item's
-- account is now looked up by the reservation's primary key.
-- Objects: constraint reservations_valid of billing.reservations (plain); drops
--   billing.reservation_is_valid(); redefines public.settle_reservations().
--
-- Lock order, unchanged: settle_reservations settles in ascending user_id order, then id.

alter table billing.reservations
drop constraint reservations_valid,
-- One constraint: Postgres 15 prepares each CHECK of a table for every statement that writes it.
add constraint reservations_valid check (
  amount > 0
  and length(idempotency_key) between 1 and 255
  and (
    (status = 'pending' and resolved_at is null and settle_amount is null)
    or (
      status = 'settled'
      and resolved_at is not null
      and settle_amount is not null
      and settle_amount >= 0
    )
    or (status in ('released', 'expired') and resolved_at is not null and settle_amount is null)
  )
);

comment on constraint reservations_valid on billing.reservations is
'A positive amount, a key of 1..255 characters, and a status consistent with its resolution '
'(pending: unresolved; settled: resolved with a settle_amount of 0 or more; released or '
'expired: resolved without one).';

drop function billing.reservation_is_valid(bigint, text, text, bigint, timestamptz);

create or replace function public.settle_reservations(p_settlements jsonb)
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
        'p_settlements[%s] must be {"reservation_id": <uuid>, "amount": <integer of 0 or more>}, '
        'got %s', v_bad.idx, left(v_bad.item::text, 200));
  end if;

  -- Accounts in ascending user_id order (the lock order), each item's account found by the
  -- reservation's primary key (a subquery per item: a join was planned as a scan of the table).
  for v_item in
    select s.id, s.amount
    from (
      select
        (i.item ->> 'reservation_id')::uuid as id,
        (i.item ->> 'amount')::bigint as amount,
        i.position
      from jsonb_array_elements(p_settlements) with ordinality as i (item, position)
    ) as s
    order by
      (select r.user_id from billing.reservations as r where r.id = s.id), s.id, s.position
  loop
    return query
    select v_item.id, settled.status, settled.balance, settled.entry_id
    from public.settle_reservation(v_item.id, v_item.amount) as settled;
  end loop;
end;
$$;

comment on function public.settle_reservations(jsonb) is
'Settles many reservations in one transaction: p_settlements is a JSON array (at most 1000) of '
'{"reservation_id": uuid, "amount": integer of 0 or more}. Each item is settle_reservation '
'(statuses applied, partial, duplicate, not_pending); rows come back ordered by account, '
'then reservation id. '
'22023 for a malformed item and TBRES for an unknown reservation refuse the whole batch.';

revoke all on function public.settle_reservations(jsonb) from public, anon, authenticated;
grant execute on function public.settle_reservations(jsonb) to service_role;

insert into billing.schema_migrations (version, name) values ('20261202400300', 'plain_reservation_checks');
