-- Migration: the provider's cost of usage, on the usage record; record_usage in one statement.
--
-- Purpose: margin (what a user, a plan, a period earned less what its usage cost the provider)
-- needs the cost of each call next to its price. A price may carry the provider's cost rate
-- alongside its token rate (cost_amount micro-cents per cost_divisor units of the meter), or the
-- caller passes an item's cost itself (`cost_microcents`, e.g. from the model provider's
-- response); the usage record keeps it (null: unknown), and the plan the account was on.
-- record_usage is rewritten so the common call (a deduct, no hold) charges in ONE statement, as
-- deduct_tokens does (20261202400100_fast_ledger.sql): the account's debit with the funds
-- predicate, the ledger entry `on conflict do nothing`, the usage records and, for accumulating
-- prices, the period totals, in one data-modifying CTE. Anything else (a hold, a call that costs
-- nothing, a retried key, no funds, no account, a race) takes the careful path, the previous
-- definition's logic.
-- Objects: columns billing.prices.cost_amount, cost_divisor; billing.usage_records.cost_microcents,
--   plan; index usage_records_created_at_brin; redefines billing.price_items() (drop and create:
--   two more out arrays), public.quote_usage() (items carry cost_microcents),
--   public.record_usage().
--
-- Units and rounding: cost is in micro-cents (10^-6 of the minor unit) of the cost currency
-- (billing.settings.cost_currency, default usd: $1 = 10^8 micro-cents). An item's cost from the
-- rate card is ceil(quantity * cost_amount / cost_divisor): rounded up once per item (a cost is
-- never understated), linear in the item's own quantity (costs do not accumulate over a period
-- as graduated token prices do). A customer's override price carries the cost columns of its
-- own row. The caller's cost_microcents wins over the rate card's.
--
-- The fast path and the lock order: with a price that accumulates (graduated, or rounded per
-- period) pricing reads the period's running total; the fast path reads it without the account
-- lock, then takes the lock and checks the totals it priced from are still the totals (they
-- change only under that lock), pricing again under the lock when they are not. Prices that do
-- not accumulate take no lock before the debit statement, which locks the account as it
-- updates it. A key found used (a retry, a concurrent twin) undoes the fast path's debit (nobody
-- saw it: we hold the lock) and answers through the careful path.

alter table billing.prices
add column cost_amount bigint,
add column cost_divisor bigint not null default 1,
add constraint prices_cost_valid check (
  (cost_amount is null or cost_amount between 0 and 1000000000000)
  and cost_divisor between 1 and 1000000000
);

comment on column billing.prices.cost_amount is
'The provider''s cost of cost_divisor units of the meter, in micro-cents of the cost currency '
'(billing.settings.cost_currency); null: the rate card does not know the cost.';
comment on column billing.prices.cost_divisor is
'Divides cost_amount: 250 / 1000000 is 250 micro-cents per 1M units. An item''s cost is rounded '
'up once, to a whole micro-cent.';

alter table billing.usage_records
add column cost_microcents bigint,
add column plan text,
drop constraint usage_records_amounts,
-- One constraint, for the reason given at billing.ledger_entries' ledger_entries_shape.
add constraint usage_records_amounts check (
  quantity >= 0 and tokens >= 0 and line >= 1 and (cost_microcents is null or cost_microcents >= 0)
);

comment on column billing.usage_records.cost_microcents is
'What the item cost the provider, in micro-cents of the cost currency: the caller''s figure or '
'the price''s cost rate (rounded up); null when neither was known.';
comment on column billing.usage_records.plan is
'The plan of the account (billing.accounts.plan) when the usage was recorded; null for records '
'written before 20261202650000.';

-- Margin and cost reports read usage by period, not by user: the table is append-only, so a
-- BRIN index on created_at stays small and exact enough.
create index usage_records_created_at_brin on billing.usage_records
using brin (created_at) with (pages_per_range = 32);

drop function billing.price_items(uuid, jsonb, timestamptz);

create function billing.price_items(
  p_user_id uuid,
  p_items jsonb,
  p_as_of timestamptz,
  out meter_codes text[],
  out quantities bigint[],
  out dimensions jsonb[],
  out dimension_values text[],
  out price_ids bigint[],
  out percents_off integer[],
  out tokens bigint[],
  out accumulates boolean[],
  out period_start timestamptz,
  out costs bigint[],
  out period_used bigint[]
)
language plpgsql stable
set search_path = ''
as $$
declare
  v_item jsonb;
  v_dimensions jsonb;
  v_dimension record;
  v_value text;
  v_found record;
  v_price billing.prices;
  v_used numeric;
  v_before numeric;
  v_after numeric;
  v_charge numeric;
  -- Quantities of earlier items of this call, per meter and dimension value.
  v_in_call jsonb := '{}'::jsonb;
  v_key text;
  -- F at each quantity asked for (the period's total before and after, or the item's own).
  v_quantities numeric [];
  v_rated numeric [];
  v_q numeric;
  v_tier jsonb;
  v_lower numeric;
  v_upper numeric;
  v_units numeric;
  v_flat numeric;
  v_in_tier numeric;
  v_f numeric;
  v_cost bigint;
begin
  if p_items is null or jsonb_typeof(p_items) <> 'array' or jsonb_array_length(p_items) = 0
    or jsonb_array_length(p_items) > 100 then
    raise exception using
      errcode = '22023',
      message = 'p_items must be a JSON array of 1 to 100 items {meter, quantity, dimensions}';
  end if;
  for i in 0 .. jsonb_array_length(p_items) - 1 loop
    v_item := p_items -> i;
    if jsonb_typeof(v_item) is distinct from 'object'
      or jsonb_typeof(v_item -> 'meter') is distinct from 'string'
      or jsonb_typeof(v_item -> 'quantity') is distinct from 'number'
      or (v_item ->> 'quantity')::numeric <> trunc((v_item ->> 'quantity')::numeric)
      or (v_item ->> 'quantity')::numeric not between 0 and 1000000000000
      or coalesce(jsonb_typeof(v_item -> 'dimensions'), 'object') not in ('object', 'null') then
      raise exception using
        errcode = '22023',
        message = format(
          'p_items[%s] must be {"meter": text, "quantity": an integer 0..10^12, "dimensions": {...}}', i);
    end if;
    if v_item ? 'cost_microcents' and (
      jsonb_typeof(v_item -> 'cost_microcents') is distinct from 'number'
      or (v_item ->> 'cost_microcents')::numeric <> trunc((v_item ->> 'cost_microcents')::numeric)
      or (v_item ->> 'cost_microcents')::numeric not between 0 and 1000000000000000) then
      raise exception using
        errcode = '22023',
        message = format('p_items[%s].cost_microcents must be an integer 0..10^15 (the provider''s cost)', i);
    end if;
    v_dimensions := coalesce(nullif(v_item -> 'dimensions', 'null'), '{}');
    if v_dimensions <> '{}' then
      for v_dimension in select * from jsonb_each(v_dimensions) loop
        if jsonb_typeof(v_dimension.value) <> 'string' or length(v_dimension.value #>> '{}') > 200
          or length(v_dimension.key) > 64 then
          raise exception using
            errcode = '22023',
            message = format('p_items[%s].dimensions.%s must be a text of at most 200 characters',
              i, left(v_dimension.key, 64));
        end if;
      end loop;
    end if;

    -- One query: the meter, the user's term for it, and the price (override or list version).
    select
      m.code, coalesce(v_dimensions ->> m.dimension, '') as dimension_value, m.dimension,
      t.percent_off, t.override_price_id, coalesce(o, l.price) as price
    into v_found
    from billing.meters as m
    left join lateral (
      select ct.percent_off, ct.override_price_id
      from billing.customer_terms as ct
      where ct.user_id = p_user_id
        and (ct.meter_code = m.code or ct.meter_code is null)
        and ct.valid_from <= p_as_of and (ct.valid_until is null or p_as_of < ct.valid_until)
      order by ct.meter_code is null, ct.valid_from desc, ct.id desc
      limit 1
    ) as t on true
    left join billing.prices as o on o.id = t.override_price_id
    left join lateral (
      select lp as price
      from billing.prices as lp
      where t.override_price_id is null and lp.meter_code = m.code and not lp.custom
        and lp.dimension_value in (coalesce(v_dimensions ->> m.dimension, ''), '*')
        and lp.effective_from <= p_as_of
      order by lp.dimension_value = '*', lp.effective_from desc, lp.id desc
      limit 1
    ) as l on true
    where m.code = v_item ->> 'meter';
    if v_found.code is null then
      raise exception using
        errcode = '22023',
        message = format('p_items[%s].meter: unknown meter %L', i, v_item ->> 'meter');
    end if;
    v_price := v_found.price;
    v_value := v_found.dimension_value;
    if v_price.id is null then
      raise exception using
        errcode = 'TBPRC',
        message = format('meter %s has no price for %s at %s', v_found.code,
          coalesce(v_found.dimension || ' = ' || quote_literal(v_value), 'its usage'), p_as_of);
    end if;

    if v_price.scheme = 'graduated' or v_price.unit_divisor > 1 or v_price.package_size > 1 then
      -- Accumulating: what this period used before, so the call pays its share of F exactly.
      if period_start is null then
        select coalesce(s.current_period_start, date_trunc('month', p_as_of, 'UTC')) into period_start
        from (select 1) as one
        left join lateral (
          select sub.current_period_start
          from billing.subscriptions as sub
          where sub.user_id = p_user_id
            and sub.status in ('active', 'trialing', 'past_due')
            and sub.current_period_start <= p_as_of and p_as_of < sub.current_period_end
          order by sub.current_period_start desc
          limit 1
        ) as s on true;
      end if;
      v_key := v_found.code || '/' || v_value;
      select coalesce(max(t.quantity), 0) into v_used
      from billing.usage_totals as t
      where t.user_id = p_user_id and t.meter_code = v_found.code and t.dimension_value = v_value
        and t.period_start = price_items.period_start;
      accumulates := accumulates || true;
      period_used := period_used || v_used::bigint;
      v_before := v_used + coalesce((v_in_call ->> v_key)::numeric, 0);
      v_after := v_before + (v_item ->> 'quantity')::numeric;
      v_in_call := v_in_call || jsonb_build_object(v_key, v_after - v_used);
      v_quantities := array[v_before, v_after];
    else
      accumulates := accumulates || false;
      period_used := period_used || null::bigint;
      v_quantities := array[(v_item ->> 'quantity')::numeric];
    end if;

    -- F(q) for each quantity: expressions only (no query, no function call) on the hot path.
    -- Every division rounds as the price says: up is div(n + d - 1, d), down is div(n, d).
    v_rated := '{}';
    foreach v_q in array v_quantities loop
      if v_q <= 0 then
        v_f := 0;
      elsif v_price.scheme = 'per_unit' then
        v_f := case when v_price.rounding = 'down' then div(v_q * v_price.unit_amount, v_price.unit_divisor)
          else div(v_q * v_price.unit_amount + v_price.unit_divisor - 1, v_price.unit_divisor) end;
      elsif v_price.scheme = 'package' then
        v_f := v_price.unit_amount * case when v_price.rounding = 'down' then div(v_q, v_price.package_size)
          else div(v_q + v_price.package_size - 1, v_price.package_size) end;
      else
        v_lower := 0;
        v_units := 0;
        v_flat := 0;
        for t in 0 .. jsonb_array_length(v_price.tiers) - 1 loop
          v_tier := v_price.tiers -> t;
          v_upper := (v_tier ->> 'up_to')::numeric;
          if v_price.scheme = 'volume' then
            -- The tier the whole quantity falls in prices every unit.
            if v_upper is null or v_upper >= v_q then
              v_units := v_q * (v_tier ->> 'unit_amount')::numeric;
              v_flat := coalesce((v_tier ->> 'flat_amount')::numeric, 0);
              exit;
            end if;
          else
            -- graduated: each tier's rate for the units inside it, its flat amount once reached.
            v_in_tier := least(v_q, coalesce(v_upper, v_q)) - v_lower;
            exit when v_in_tier <= 0;
            v_units := v_units + v_in_tier * (v_tier ->> 'unit_amount')::numeric;
            v_flat := v_flat + coalesce((v_tier ->> 'flat_amount')::numeric, 0);
            v_lower := v_upper;
            exit when v_upper is null;
          end if;
        end loop;
        v_f := v_flat + case when v_price.rounding = 'down' then div(v_units, v_price.unit_divisor)
          else div(v_units + v_price.unit_divisor - 1, v_price.unit_divisor) end;
      end if;
      -- D(x): the discount, rounded down.
      if v_found.percent_off is not null then
        v_f := v_f - div(v_f * v_found.percent_off, 100);
      end if;
      v_rated := v_rated || v_f;
    end loop;
    v_charge := v_rated[cardinality(v_rated)] - case when cardinality(v_rated) = 2 then v_rated[1] else 0 end;
    if (v_item ->> 'quantity')::bigint > 0 then
      v_charge := greatest(v_charge, v_price.minimum_tokens);
    end if;

    meter_codes := meter_codes || v_found.code;
    quantities := quantities || (v_item ->> 'quantity')::bigint;
    dimensions := dimensions || v_dimensions;
    dimension_values := dimension_values || v_value;
    price_ids := price_ids || v_price.id;
    percents_off := percents_off || v_found.percent_off;
    tokens := tokens || v_charge::bigint;
    -- The provider's cost: the caller's figure, else the price's cost rate for the item's own
    -- quantity (costs do not accumulate), rounded up to a whole micro-cent; null when unknown.
    if v_item ? 'cost_microcents' then
      v_cost := (v_item ->> 'cost_microcents')::bigint;
    elsif v_price.cost_amount is not null then
      v_cost := div((v_item ->> 'quantity')::numeric * v_price.cost_amount + v_price.cost_divisor - 1,
        v_price.cost_divisor)::bigint;
    else
      v_cost := null;
    end if;
    costs := costs || v_cost;
  end loop;
end;
$$;

comment on function billing.price_items(uuid, jsonb, timestamptz) is
'Prices each usage item for a user at a time (price version, customer term, period '
'accumulation; see 20261202500000_rate_cards.sql) and its provider cost in micro-cents (the '
'item''s cost_microcents, else the price''s cost rate; see 20261202650000_usage_costs.sql), as '
'arrays in item order, with the period totals it read (period_used, null for items that do not '
'accumulate). Raises 22023 on a bad item (naming it) or an unknown meter, TBPRC when a meter has '
'no price. Reads only.';

revoke all on function billing.price_items(uuid, jsonb, timestamptz) from public;

create or replace function public.quote_usage(
  p_user_id uuid, p_items jsonb, p_as_of timestamptz default now()
)
returns table (tokens bigint, items jsonb)
language sql stable
-- Definer: it calls the private billing.price_items, which no API role may execute.
security definer
set search_path = ''
as $$
  select
    (select sum(t)::bigint from unnest(p.tokens) as t),
    (
      select jsonb_agg(jsonb_build_object(
        'meter', u.meter, 'quantity', u.quantity, 'dimensions', u.dimensions,
        'price_id', u.price_id, 'percent_off', u.percent_off, 'tokens', u.tokens,
        'cost_microcents', u.cost
      ) order by u.line)
      from unnest(p.meter_codes, p.quantities, p.dimensions, p.price_ids, p.percents_off, p.tokens, p.costs)
        with ordinality as u (meter, quantity, dimensions, price_id, percent_off, tokens, cost, line)
    )
  from billing.price_items(p_user_id, p_items, coalesce(p_as_of, now())) as p
$$;

comment on function public.quote_usage(uuid, jsonb, timestamptz) is
'The price of usage items for a user without charging (an estimate for a hold): total tokens '
'and one object per item (meter, quantity, dimensions, price_id, percent_off, tokens, '
'cost_microcents: the provider cost, null when unknown). Counts the period''s usage so far for '
'graduated prices. 22023 on bad items, TBPRC without a price.';

create or replace function public.record_usage(
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
  v_plan text;
  v_total bigint;
  v_first jsonb;
  v_first_user uuid;
  v_first_hold uuid;
  v_first_entry bigint;
  v_priced record;
  v_charge record;
  v_entry bigint;
  v_records bigint;
begin
  if p_idempotency_key is null or length(p_idempotency_key) > 255 or length(btrim(p_idempotency_key)) = 0
    or p_idempotency_key like 'signup:%' or p_idempotency_key like 'expiry:%'
    or p_idempotency_key like 'reservation:%' or p_idempotency_key like 'stripe:%' then
    perform billing.require_caller_key('p_idempotency_key', p_idempotency_key);
  end if;

  -- The fast path: a deduct under a key no usage record has.
  if p_reservation_id is null
    and not exists (
      select from billing.usage_records as r where r.idempotency_key = p_idempotency_key
    ) then
    select * into v_priced from billing.price_items(p_user_id, p_items, now());
    select coalesce(sum(t), 0)::bigint into v_total from unnest(v_priced.tokens) as t;
    if v_total > 0 and true = any(v_priced.accumulates) then
      -- Accumulating prices: the totals change only under the account lock; priced from what
      -- they are under it, or priced again.
      perform from billing.accounts as a where a.user_id = p_user_id for no key update;
      if exists (
        select
        from unnest(v_priced.meter_codes, v_priced.dimension_values, v_priced.period_used)
          as u (meter_code, dimension_value, used)
        left join billing.usage_totals as t
          on t.user_id = p_user_id and t.meter_code = u.meter_code
            and t.dimension_value = u.dimension_value and t.period_start = v_priced.period_start
        where u.used is not null and coalesce(t.quantity, 0) <> u.used
      ) then
        select * into v_priced from billing.price_items(p_user_id, p_items, now());
        select coalesce(sum(t), 0)::bigint into v_total from unnest(v_priced.tokens) as t;
      end if;
    end if;

    if v_total > 0 then
      -- One statement: debit the account (never below available), write the entry unless its
      -- key exists, the usage records and the period totals.
      with debited as (
        update billing.accounts as a
        set balance = a.balance - v_total, undrawn = a.undrawn + v_total, updated_at = now()
        where a.user_id = p_user_id and a.balance - a.reserved >= v_total
        returning a.balance, a.plan
      ),

      entry as (
        insert into billing.ledger_entries (
          user_id, amount, balance_after, kind, idempotency_key, description, metadata
        )
        select p_user_id, -v_total, debited.balance, 'usage', p_idempotency_key, 'Usage', '{"usage": true}'
        from debited
        on conflict (idempotency_key) do nothing
        returning id
      ),

      records as (
        insert into billing.usage_records (
          user_id, idempotency_key, line, meter_code, quantity, dimensions, dimension_value,
          price_id, percent_off, tokens, entry_id, cost_microcents, plan
        )
        select
          p_user_id, p_idempotency_key, u.line, u.meter_code, u.quantity, u.dimensions,
          u.dimension_value, u.price_id, u.percent_off, u.tokens, entry.id, u.cost, debited.plan
        from entry
        cross join debited
        cross join unnest(
          v_priced.meter_codes, v_priced.quantities, v_priced.dimensions, v_priced.dimension_values,
          v_priced.price_ids, v_priced.percents_off, v_priced.tokens, v_priced.costs
        ) with ordinality as u (
          meter_code, quantity, dimensions, dimension_value, price_id, percent_off, tokens, cost, line
        )
        on conflict (idempotency_key, line) do nothing
        returning 1
      ),

      totals as (
        insert into billing.usage_totals as t (user_id, meter_code, dimension_value, period_start, quantity)
        select p_user_id, u.meter_code, u.dimension_value, v_priced.period_start, sum(u.quantity)
        from unnest(v_priced.meter_codes, v_priced.dimension_values, v_priced.quantities, v_priced.accumulates)
          as u (meter_code, dimension_value, quantity, accumulates)
        where u.accumulates and exists (select from entry)
        group by u.meter_code, u.dimension_value
        on conflict (user_id, meter_code, dimension_value, period_start)
        do update set quantity = t.quantity + excluded.quantity
      )

      select debited.balance, entry.id, (select count(*) from records)
      into v_balance, v_entry, v_records
      from debited
      left join entry on true;

      if v_entry is not null then
        if v_records <> cardinality(v_priced.tokens) then
          -- A call under the same key that cost nothing committed in between: not this call's.
          raise exception using
            errcode = 'TBKEY',
            message = format('idempotency key %L was already used with different usage', p_idempotency_key),
            hint = 'Use a new key for a new call; repeat a key only to retry the same call.';
        end if;
        return query select 'applied'::text, v_balance, v_entry, v_total;
        return;
      end if;
      if v_balance is not null then
        -- The key was used before: take the debit back (nobody saw it, we hold the lock).
        update billing.accounts as a
        set balance = a.balance + v_total, undrawn = a.undrawn - v_total
        where a.user_id = p_user_id;
      end if;
    end if;
  end if;

  -- The careful path: locks in the documented order, the hold, then the account.
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
  select a.balance, a.plan, f.items, f.user_id, f.reservation_id, f.entry_id, f.tokens
  into v_balance, v_plan, v_first, v_first_user, v_first_hold, v_first_entry, v_total
  from billing.accounts as a
  left join lateral (
    select
      jsonb_agg(jsonb_build_object('meter', r.meter_code, 'quantity', r.quantity,
        'dimensions', r.dimensions, 'cost_microcents', r.cost_microcents) order by r.line) as items,
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
    -- A retry: the first call's records decide, before anything is priced again. An item's
    -- cost_microcents is compared when the retry gives one.
    if v_first_user <> p_user_id or v_first_hold is distinct from p_reservation_id
      or v_first <> (
        select jsonb_agg(jsonb_build_object('meter', i.value ->> 'meter',
          'quantity', (i.value ->> 'quantity')::bigint,
          'dimensions', coalesce(nullif(i.value -> 'dimensions', 'null'), '{}'),
          'cost_microcents', case
            when i.value ? 'cost_microcents' then i.value -> 'cost_microcents'
            else coalesce(v_first -> (i.line::integer - 1) -> 'cost_microcents', 'null')
          end) order by i.line)
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
    percent_off, tokens, entry_id, reservation_id, cost_microcents, plan
  )
  select
    p_user_id, p_idempotency_key, u.line, u.meter_code, u.quantity, u.dimensions, u.dimension_value,
    u.price_id, u.percent_off, u.tokens, v_charge.entry_id, p_reservation_id, u.cost, v_plan
  from unnest(
    v_priced.meter_codes, v_priced.quantities, v_priced.dimensions, v_priced.dimension_values,
    v_priced.price_ids, v_priced.percents_off, v_priced.tokens, v_priced.costs
  ) with ordinality as u (
    meter_code, quantity, dimensions, dimension_value, price_id, percent_off, tokens, cost, line
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
'of deduct_tokens; one statement on the fast path). One usage record per item, with its '
'provider cost (the item''s cost_microcents, else the rate card''s) and the account''s plan. '
'Same key and items: duplicate; other items, user, hold or cost: TBKEY. 22023 on bad items or a '
'hold of another user, TBRES, TBPRC.';

insert into billing.schema_migrations (version, name) values ('20261202650000', 'usage_costs');
