-- Migration: record_usage: price usage items and charge them in one transaction.
--
-- Purpose: an agent backend sends what a model call used ({meter, quantity, dimensions} items)
-- and gets it priced (billing.price_items) and charged at once: from a pending hold, which it
-- settles (overrun as settle_reservation says), or as a deduct. One usage record per item
-- keeps the price version and the ledger entry. The charge is made by public.deduct_tokens or
-- public.settle_reservation / public.release_reservation themselves, so their rules (never
-- below available, overrun capped, a hold resolves once) hold here unchanged.
-- Objects: public.record_usage().
--
-- Lock order: the reservation (when a hold is settled), then the account, as settle_reservation
-- takes them; then pricing reads the period's running totals (billing.usage_totals) under the
-- account lock and this call adds to them, so two calls of one user never price the same
-- graduated tier twice.
--
-- Idempotency: the key is the call's. Usage records carry it (unique with the item's line);
-- a deduct's ledger entry carries it too. The same key with the same user, hold and items
-- answers the first result as duplicate, whatever has been used since; other items (or another
-- user or hold) raise TBKEY. A key taken by a plain deduct_tokens raises TBKEY as well.

create function public.record_usage(
  p_user_id uuid,
  p_items jsonb,
  p_idempotency_key text,
  p_reservation_id uuid default null
) returns table (status text, balance bigint, entry_id bigint, tokens bigint)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_hold_user uuid;
  v_hold_status text;
  v_balance bigint;
  v_total bigint;
  v_first jsonb;
  v_first_user uuid;
  v_first_hold uuid;
  v_first_entry bigint;
  v_priced record;
  v_charge record;
begin
  if p_idempotency_key is null or length(p_idempotency_key) > 255 or length(btrim(p_idempotency_key)) = 0
    or p_idempotency_key ~ '^(signup|expiry|reservation|stripe):' then
    perform billing.require_caller_key('p_idempotency_key', p_idempotency_key);
  end if;

  -- Locks, in the documented order: the hold, then the account.
  if p_reservation_id is not null then
    select r.user_id, r.status into v_hold_user, v_hold_status
    from billing.reservations as r
    where r.id = p_reservation_id
    for no key update;
    if not found then
      raise exception using
        errcode = 'TBRES', message = format('reservation %s not found', p_reservation_id);
    end if;
    if v_hold_user is distinct from p_user_id then
      raise exception using
        errcode = '22023',
        message = format('reservation %s is not a hold of user %s', p_reservation_id, p_user_id);
    end if;
  end if;
  -- The account lock and the first call's records under this key (a retry), in one statement.
  select a.balance, f.items, f.user_id, f.reservation_id, f.entry_id, f.tokens
  into v_balance, v_first, v_first_user, v_first_hold, v_first_entry, v_total
  from billing.accounts as a
  left join lateral (
    select
      jsonb_agg(jsonb_build_object('meter', r.meter_code, 'quantity', r.quantity,
        'dimensions', r.dimensions) order by r.line) as items,
      min(r.user_id::text)::uuid as user_id, min(r.reservation_id::text)::uuid as reservation_id,
      min(r.entry_id) as entry_id, sum(r.tokens)::bigint as tokens
    from billing.usage_records as r
    where r.idempotency_key = p_idempotency_key
  ) as f on true
  where a.user_id = p_user_id
  for no key update of a;
  if not found then
    perform billing.price_items(p_user_id, p_items, now());
    return query select 'unknown_account'::text, null::bigint, null::bigint, null::bigint;
    return;
  end if;

  if v_first is not null then
    -- A retry: the first call's records decide, before anything is priced again.
    if v_first_user <> p_user_id or v_first_hold is distinct from p_reservation_id
      or v_first <> (
        select jsonb_agg(jsonb_build_object('meter', i.value ->> 'meter',
          'quantity', (i.value ->> 'quantity')::bigint,
          'dimensions', coalesce(nullif(i.value -> 'dimensions', 'null'), '{}')) order by i.line)
        from jsonb_array_elements(p_items) with ordinality as i (value, line)
      ) then
      raise exception using
        errcode = 'TBKEY',
        message = format('idempotency key %L was already used with different usage', p_idempotency_key),
        hint = 'Use a new key for a new call; repeat a key only to retry the same call.';
    end if;
    return query
    select 'duplicate'::text, coalesce(e.balance_after, v_balance), e.id, v_total
    from (select 1) as one
    left join billing.ledger_entries as e on e.id = v_first_entry;
    return;
  end if;

  if v_hold_status <> 'pending' then
    return query select 'not_pending'::text, v_balance, null::bigint, null::bigint;
    return;
  end if;

  select * into v_priced from billing.price_items(p_user_id, p_items, now());
  select coalesce(sum(t), 0)::bigint into v_total from unnest(v_priced.tokens) as t;

  if p_reservation_id is not null and v_total = 0 then
    select 'applied'::text as status, v_balance as balance, null::bigint as entry_id into v_charge
    from public.release_reservation(p_reservation_id) as r;
  elsif p_reservation_id is not null then
    select s.status, s.balance, s.entry_id into v_charge
    from public.settle_reservation(p_reservation_id, v_total) as s;
  elsif v_total = 0 then
    select 'applied'::text as status, v_balance as balance, null::bigint as entry_id into v_charge;
  else
    select d.status, d.balance, d.entry_id into v_charge
    from public.deduct_tokens(p_user_id, v_total, p_idempotency_key, 'Usage', '{"usage": true}') as d;
    if v_charge.status = 'duplicate' then
      -- The key is a plain deduct's (no usage record has it): not this call's.
      raise exception using
        errcode = 'TBKEY',
        message = format('idempotency key %L was already used by a deduct (ledger entry %s)',
          p_idempotency_key, v_charge.entry_id);
    end if;
  end if;

  if v_charge.status not in ('applied', 'partial') then
    return query select v_charge.status, v_charge.balance, v_charge.entry_id, v_total;
    return;
  end if;

  insert into billing.usage_records (
    user_id, idempotency_key, line, meter_code, quantity, dimensions, dimension_value, price_id,
    percent_off, tokens, entry_id, reservation_id
  )
  select
    p_user_id, p_idempotency_key, u.line, u.meter_code, u.quantity, u.dimensions, u.dimension_value,
    u.price_id, u.percent_off, u.tokens, v_charge.entry_id, p_reservation_id
  from unnest(
    v_priced.meter_codes, v_priced.quantities, v_priced.dimensions, v_priced.dimension_values,
    v_priced.price_ids, v_priced.percents_off, v_priced.tokens
  ) with ordinality as u (
    meter_code, quantity, dimensions, dimension_value, price_id, percent_off, tokens, line
  );

  if true = any(v_priced.accumulates) then
    insert into billing.usage_totals as t (user_id, meter_code, dimension_value, period_start, quantity)
    select p_user_id, u.meter_code, u.dimension_value, v_priced.period_start, sum(u.quantity)
    from unnest(v_priced.meter_codes, v_priced.dimension_values, v_priced.quantities, v_priced.accumulates)
      as u (meter_code, dimension_value, quantity, accumulates)
    where u.accumulates
    group by u.meter_code, u.dimension_value
    on conflict (user_id, meter_code, dimension_value, period_start)
    do update set quantity = t.quantity + excluded.quantity;
  end if;

  return query select v_charge.status, v_charge.balance, v_charge.entry_id, v_total;
end;
$$;

comment on function public.record_usage(uuid, jsonb, text, uuid) is
'Prices usage items (as quote_usage) and charges them in one transaction: settling the given '
'hold (statuses of settle_reservation; 0 tokens releases it, applied) or as a deduct (statuses '
'of deduct_tokens). One usage record per item. Same key and items: duplicate; other items, '
'user or hold: TBKEY. 22023 on bad items or a hold of another user, TBRES, TBPRC.';

revoke all on function public.record_usage(uuid, jsonb, text, uuid) from public, anon, authenticated;
grant execute on function public.record_usage(uuid, jsonb, text, uuid) to service_role;

insert into billing.schema_migrations (version, name) values ('20261202500100', 'record_usage');
