-- Migration: rate cards: meters, versioned prices, customer terms, and the usage records.
--
-- Purpose: turn what an agent used (model tokens, runs, reports) into our tokens in one place,
-- so no caller writes pricing code. A meter names a usage dimension with a unit; a price of a
-- meter converts its quantity to tokens with one of Stripe's billing schemes (per_unit,
-- package = transform_quantity, graduated and volume tiers), integers only, every rounding
-- stated on the price. Prices are versions: a new price is a new row with a later
-- effective_from, never an edit (trigger), and each usage record keeps the version it was
-- charged at. Customer terms give one user a percent discount or an override price for a while.
-- Objects: billing.meters, billing.prices (+ append-only trigger), billing.customer_terms,
--   billing.usage_records (+ append-only trigger), billing.usage_totals,
--   billing.price_items(), public.quote_usage(), public.usage_summary(),
--   public.my_usage().
--
-- How an item is priced (billing.price_items):
--   1. The price: the user's valid customer term for the meter (or for every meter) picks an
--      override price or a percent discount; otherwise the list price of the meter for the
--      item's value of the meter's dimension (e.g. model = gpt-4o), else its default ('*'),
--      the version with the latest effective_from at or before the time of pricing.
--   2. F(q), the tokens of a quantity q under the price, rounded once as the price says
--      (rounding up or down, of a division by unit_divisor, or of q / package_size):
--        per_unit   round(q * unit_amount / unit_divisor)
--        package    round(q / package_size) * unit_amount
--        graduated  round(sum over tiers of units_in_tier * unit_amount / unit_divisor)
--                   + the flat_amount of every tier reached
--        volume     round(q * unit_amount_t / unit_divisor) + flat_amount_t, t = q's tier
--   3. Accumulating prices (graduated, and per_unit or package whose rounding makes small
--      calls cost more than their share: unit_divisor > 1 or package_size > 1) charge
--      D(F(c + q)) - D(F(c)), c = the quantity already used in the user's billing period for
--      the same meter and dimension value (earlier items of the same call included; kept as a
--      running total in billing.usage_totals, so a call reads one row, not the period). The
--      charges of a period then add up to exactly D(F(total)), however the total was split
--      into calls. Other prices (and volume tiers, which are by the item's own quantity)
--      charge D(F(q)).
--   4. D(x) = x - floor(x * percent_off / 100): the discount is rounded down (whole tokens off).
--   5. A minimum charge (minimum_tokens) applies per item with a quantity above zero, after
--      the discount; it is the one rule that makes a split cost more than the whole.
--
-- The billing period of the user's plan: the current period of the user's live Stripe
-- subscription (billing.subscriptions), else the calendar month (UTC) of the time of pricing.

-- Meters -----------------------------------------------------------------------------------------

create table billing.meters (
  code text primary key,
  unit text not null,
  description text,
  dimension text,
  created_at timestamptz not null default now(),
  constraint meters_code_format check (code ~ '^[a-z0-9_.:-]{1,64}$'),
  constraint meters_unit_present check (length(unit) between 1 and 64),
  constraint meters_dimension_format check (dimension ~ '^[a-z0-9_]{1,64}$')
);

comment on table billing.meters is
'What usage is measured in: one row per usage dimension (llm.input_tokens, agent.run, ...). '
'Edited by the host (owner); items name a meter by code.';
comment on column billing.meters.code is 'Stable meter name used in usage items, e.g. llm.input_tokens.';
comment on column billing.meters.unit is 'The unit of a quantity, e.g. token, run, report.';
comment on column billing.meters.description is 'For people.';
comment on column billing.meters.dimension is
'The item dimension (a key of its dimensions object, e.g. model) whose value selects the price; '
'null: one price for the whole meter.';
comment on column billing.meters.created_at is 'When the meter was created.';

alter table billing.meters enable row level security;

-- The catalog is not secret: signed-in users read the meters (their usage summary names them).
create policy meters_select_all on billing.meters
for select to authenticated
using (true);

revoke all on billing.meters from public, anon, authenticated, service_role;
grant select on billing.meters to authenticated, service_role;

-- Prices -----------------------------------------------------------------------------------------

-- The rules of a price row in one function, for the reason given at
-- billing.ledger_entry_is_valid (a CHECK is parsed again by every statement writing the table).
create function billing.price_is_valid(
  p_scheme text,
  p_unit_amount bigint,
  p_unit_divisor bigint,
  p_package_size bigint,
  p_rounding text,
  p_tiers jsonb,
  p_minimum_tokens bigint
) returns boolean
language plpgsql immutable
set search_path = ''
as $$
declare
  v_tier jsonb;
  v_last numeric := 0;
  v_count int;
  v_index int := 0;
begin
  if p_scheme is null or p_rounding not in ('up', 'down') or p_unit_divisor is null
    or p_unit_divisor < 1 or p_unit_divisor > 1000000000 or p_package_size is null
    or p_package_size < 1 or p_minimum_tokens is null or p_minimum_tokens < 0 then
    return false;
  end if;
  if p_scheme = 'per_unit' then
    return p_unit_amount between 0 and 1000000000 and p_package_size = 1 and p_tiers is null;
  elsif p_scheme = 'package' then
    return p_unit_amount between 0 and 1000000000 and p_unit_divisor = 1 and p_tiers is null;
  elsif p_scheme not in ('graduated', 'volume') then
    return false;
  end if;
  -- Tiers: a non-empty array of {up_to, unit_amount, flat_amount?}, up_to increasing, the last
  -- one null (no upper bound); amounts whole tokens, not negative.
  if p_unit_amount is not null or p_package_size <> 1 or jsonb_typeof(p_tiers) is distinct from 'array' then
    return false;
  end if;
  v_count := jsonb_array_length(p_tiers);
  if v_count = 0 or v_count > 32 then
    return false;
  end if;
  for v_tier in select value from jsonb_array_elements(p_tiers) loop
    v_index := v_index + 1;
    if jsonb_typeof(v_tier) <> 'object'
      or jsonb_typeof(v_tier -> 'unit_amount') is distinct from 'number'
      or (v_tier ->> 'unit_amount')::numeric not between 0 and 1000000000
      or (v_tier ->> 'unit_amount')::numeric <> trunc((v_tier ->> 'unit_amount')::numeric)
      or (v_tier ? 'flat_amount' and (
        jsonb_typeof(v_tier -> 'flat_amount') <> 'number'
        or (v_tier ->> 'flat_amount')::numeric not between 0 and 1000000000
        or (v_tier ->> 'flat_amount')::numeric <> trunc((v_tier ->> 'flat_amount')::numeric))) then
      return false;
    end if;
    if v_index = v_count then
      if coalesce(jsonb_typeof(v_tier -> 'up_to'), 'null') <> 'null' then
        return false;
      end if;
    elsif jsonb_typeof(v_tier -> 'up_to') is distinct from 'number'
      or (v_tier ->> 'up_to')::numeric <= v_last
      or (v_tier ->> 'up_to')::numeric <> trunc((v_tier ->> 'up_to')::numeric)
      or (v_tier ->> 'up_to')::numeric > 1000000000000 then
      return false;
    else
      v_last := (v_tier ->> 'up_to')::numeric;
    end if;
  end loop;
  return true;
end;
$$;

comment on function billing.price_is_valid(text, bigint, bigint, bigint, text, jsonb, bigint) is
'CHECK of billing.prices: per_unit (unit_amount, unit_divisor), package (unit_amount per '
'package_size units), graduated or volume (tiers: up_to increasing, the last null); rounding up '
'or down; whole, non-negative token amounts.';

revoke all on function billing.price_is_valid(text, bigint, bigint, bigint, text, jsonb, bigint) from public;

create table billing.prices (
  id bigint generated always as identity primary key,
  meter_code text not null references billing.meters (code),
  dimension_value text not null default '*',
  custom boolean not null default false,
  scheme text not null,
  unit_amount bigint,
  unit_divisor bigint not null default 1,
  package_size bigint not null default 1,
  rounding text not null default 'up',
  tiers jsonb,
  minimum_tokens bigint not null default 0,
  effective_from timestamptz not null default now(),
  description text,
  created_at timestamptz not null default now(),
  constraint prices_valid check (
    billing.price_is_valid(scheme, unit_amount, unit_divisor, package_size, rounding, tiers, minimum_tokens)
  ),
  constraint prices_dimension_value_present check (length(dimension_value) between 1 and 200),
  constraint prices_custom_for_all_values check (not custom or dimension_value = '*')
);

-- The lookup of billing.price_items: the newest version of a list price at a time.
create index prices_lookup_idx on billing.prices (meter_code, dimension_value, effective_from desc, id desc)
where not custom;

comment on table billing.prices is
'Price versions: each row converts a meter''s quantity to tokens from effective_from on, until '
'a later version of the same meter and dimension value. Rows are never changed (trigger): a new '
'price is a new version, so history is never rewritten. Integer arithmetic, rounding stated.';
comment on column billing.prices.id is 'The price version; usage records keep it.';
comment on column billing.prices.meter_code is 'The meter this price is for.';
comment on column billing.prices.dimension_value is
'The value of the meter''s dimension this price is for (e.g. gpt-4o), or * for the default.';
comment on column billing.prices.custom is
'An override price of customer terms only, never a list price (applies to every dimension value).';
comment on column billing.prices.scheme is
'per_unit, package (Stripe''s transform_quantity), graduated or volume (Stripe''s tiered modes).';
comment on column billing.prices.unit_amount is
'Tokens per unit (per_unit, divided by unit_divisor) or per package (package); null for tiers.';
comment on column billing.prices.unit_divisor is
'Divides the amounts of per_unit and tiered prices: 25 / 10000 is 2.5 tokens per 1K units. '
'The division is rounded once, as rounding says.';
comment on column billing.prices.package_size is 'package: units per package (e.g. 1000).';
comment on column billing.prices.rounding is
'up or down: how the division (by unit_divisor or package_size) rounds to whole tokens/packages.';
comment on column billing.prices.tiers is
'graduated/volume: [{"up_to": n | null, "unit_amount": a, "flat_amount": f?}], up_to increasing, '
'the last null.';
comment on column billing.prices.minimum_tokens is
'The least an item with a quantity above zero costs, after any discount (0: none).';
comment on column billing.prices.effective_from is 'When this version starts to apply.';
comment on column billing.prices.description is 'For people.';
comment on column billing.prices.created_at is 'When the version was written.';

create function billing.tg_prices__refuse_change() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  raise exception using
    errcode = 'TBAPP',
    message = format('billing.prices is append-only: %s of price %s refused', tg_op, old.id),
    hint = 'Insert a new version with a later effective_from; usage records keep the version they used.';
end;
$$;

comment on function billing.tg_prices__refuse_change() is
'Trigger: refuses every update and delete of a price version, for every role.';

revoke all on function billing.tg_prices__refuse_change() from public;

create trigger tg_prices__10_refuse_change
before update or delete on billing.prices
for each row execute function billing.tg_prices__refuse_change();

alter table billing.prices enable row level security;

-- List prices are public knowledge; custom prices are one customer's terms (service role only).
create policy prices_select_list on billing.prices
for select to authenticated
using (not custom);

revoke all on billing.prices from public, anon, authenticated, service_role;
grant select on billing.prices to authenticated, service_role;

-- Customer terms ---------------------------------------------------------------------------------

create table billing.customer_terms (
  id bigint generated always as identity primary key,
  user_id uuid not null references billing.accounts (user_id),
  meter_code text references billing.meters (code),
  percent_off integer,
  override_price_id bigint references billing.prices (id),
  valid_from timestamptz not null default now(),
  valid_until timestamptz,
  description text,
  created_at timestamptz not null default now(),
  constraint customer_terms_one_kind check (
    (percent_off between 1 and 100 and override_price_id is null)
    or (percent_off is null and override_price_id is not null and meter_code is not null)
  ),
  constraint customer_terms_valid_ordered check (valid_until > valid_from)
);

create index customer_terms_user_id_idx on billing.customer_terms (user_id, valid_from desc);

comment on table billing.customer_terms is
'A user''s own terms, valid from valid_from until valid_until: a percent discount (on one meter '
'or, with meter_code null, on all) or an override price (custom) for one meter. When several '
'apply, the one for the meter wins over the one for all meters, then the latest valid_from.';
comment on column billing.customer_terms.id is 'Term id.';
comment on column billing.customer_terms.user_id is 'The customer.';
comment on column billing.customer_terms.meter_code is 'The meter the term is for; null: every meter (discounts only).';
comment on column billing.customer_terms.percent_off is
'1..100: the discount, D(x) = x - floor(x * percent_off / 100) (rounded down).';
comment on column billing.customer_terms.override_price_id is
'A custom price used instead of the list price of the meter, for every dimension value.';
comment on column billing.customer_terms.valid_from is 'Start of validity (inclusive).';
comment on column billing.customer_terms.valid_until is 'End of validity (exclusive); null: open.';
comment on column billing.customer_terms.description is 'For people (the deal, the contract).';
comment on column billing.customer_terms.created_at is 'When the term was written.';

alter table billing.customer_terms enable row level security;
-- No policy: service role only (one customer's deal is not for other readers).
revoke all on billing.customer_terms from public, anon, authenticated, service_role;
grant select on billing.customer_terms to service_role;

-- Usage records ----------------------------------------------------------------------------------

create table billing.usage_records (
  id bigint generated always as identity primary key,
  user_id uuid not null,
  idempotency_key text not null,
  line smallint not null,
  meter_code text not null,
  quantity bigint not null,
  dimensions jsonb not null default '{}',
  dimension_value text not null,
  -- No foreign key: record_usage writes the id of the price it has just read, and prices are
  -- never deleted (trigger); a foreign key would add a query per record to the hot path.
  price_id bigint not null,
  percent_off integer,
  tokens bigint not null,
  entry_id bigint,
  reservation_id uuid,
  created_at timestamptz not null default now(),
  constraint usage_records_key_line_unique unique (idempotency_key, line),
  constraint usage_records_amounts check (quantity >= 0 and tokens >= 0 and line >= 1)
);

-- Summaries per user and period.
create index usage_records_user_created_idx on billing.usage_records (user_id, created_at);

comment on table billing.usage_records is
'Append-only: one row per usage item recorded by record_usage, with the meter, quantity, '
'dimensions, the price version and customer discount it was priced with, the tokens it was '
'priced at and the ledger entry that charged the call (null when the call cost nothing).';
comment on column billing.usage_records.id is 'Record id, in the order usage was recorded.';
comment on column billing.usage_records.user_id is 'Whose usage.';
comment on column billing.usage_records.idempotency_key is
'The record_usage call''s key (also the key of its ledger entry when it charged as a deduct).';
comment on column billing.usage_records.line is 'The item''s position in the call, from 1.';
comment on column billing.usage_records.meter_code is 'The meter.';
comment on column billing.usage_records.quantity is 'How much, in the meter''s unit.';
comment on column billing.usage_records.dimensions is 'The item''s dimensions as sent (e.g. {"model": "gpt-4o"}).';
comment on column billing.usage_records.dimension_value is
'The value of the meter''s dimension (empty when the meter has none): tiers accumulate per value.';
comment on column billing.usage_records.price_id is 'The price version the item was priced at.';
comment on column billing.usage_records.percent_off is 'The customer discount applied, if any.';
comment on column billing.usage_records.tokens is
'Tokens the item was priced at; their sum over the call is what was charged (a partial '
'settlement charged less: its ledger entry says what).';
comment on column billing.usage_records.entry_id is 'The ledger entry that charged the call.';
comment on column billing.usage_records.reservation_id is 'The hold the call settled, if any.';
comment on column billing.usage_records.created_at is 'When the usage was recorded; it counts in that period.';

create function billing.tg_usage_records__refuse_change() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  raise exception using
    errcode = 'TBAPP',
    message = format('billing.usage_records is append-only: %s refused', tg_op);
end;
$$;

comment on function billing.tg_usage_records__refuse_change() is
'Trigger: refuses every update, delete and truncate of usage records, for every role.';

revoke all on function billing.tg_usage_records__refuse_change() from public;

create trigger tg_usage_records__10_refuse_change
before update or delete on billing.usage_records
for each row execute function billing.tg_usage_records__refuse_change();

create trigger tg_usage_records__11_refuse_truncate
before truncate on billing.usage_records
for each statement execute function billing.tg_usage_records__refuse_change();

alter table billing.usage_records enable row level security;

create policy usage_records_select_own on billing.usage_records
for select to authenticated
using (user_id = (select auth.uid()));

revoke all on billing.usage_records from public, anon, authenticated, service_role;
grant select on billing.usage_records to authenticated, service_role;

-- The running totals graduated and rounded prices read: one row per user, meter, dimension value
-- and billing period, so pricing a call reads one row however many calls the period had.
create table billing.usage_totals (
  user_id uuid not null,
  meter_code text not null,
  dimension_value text not null,
  period_start timestamptz not null,
  quantity bigint not null,
  constraint usage_totals_pkey primary key (user_id, meter_code, dimension_value, period_start),
  constraint usage_totals_quantity_not_negative check (quantity >= 0)
);

comment on table billing.usage_totals is
'Per user, meter, dimension value and billing period: the quantity recorded by accumulating '
'prices (graduated, or rounded per period). Written by record_usage in the transaction that '
'writes the usage records, under the account lock: it always equals their sum.';
comment on column billing.usage_totals.user_id is 'Whose usage.';
comment on column billing.usage_totals.meter_code is 'The meter.';
comment on column billing.usage_totals.dimension_value is 'The value of the meter''s dimension (or empty).';
comment on column billing.usage_totals.period_start is 'Start of the billing period it counts.';
comment on column billing.usage_totals.quantity is 'The period''s quantity so far.';

alter table billing.usage_totals enable row level security;
-- No policy: service role only (users read their usage through usage_records).
revoke all on billing.usage_totals from public, anon, authenticated, service_role;
grant select on billing.usage_totals to service_role;

-- Pricing ----------------------------------------------------------------------------------------

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
  out period_start timestamptz
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
      v_before := v_used + coalesce((v_in_call ->> v_key)::numeric, 0);
      v_after := v_before + (v_item ->> 'quantity')::numeric;
      v_in_call := v_in_call || jsonb_build_object(v_key, v_after - v_used);
      v_quantities := array[v_before, v_after];
    else
      accumulates := accumulates || false;
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
  end loop;
end;
$$;

comment on function billing.price_items(uuid, jsonb, timestamptz) is
'Prices each usage item for a user at a time (price version, customer term, period '
'accumulation; see the migration header), as arrays in item order. Raises 22023 on a bad item '
'(naming it) or an unknown meter, TBPRC when a meter has no price. Reads only; record_usage '
'calls it under the account lock.';

revoke all on function billing.price_items(uuid, jsonb, timestamptz) from public;

-- The public RPCs --------------------------------------------------------------------------------

create function public.quote_usage(p_user_id uuid, p_items jsonb, p_as_of timestamptz default now())
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
        'price_id', u.price_id, 'percent_off', u.percent_off, 'tokens', u.tokens
      ) order by u.line)
      from unnest(p.meter_codes, p.quantities, p.dimensions, p.price_ids, p.percents_off, p.tokens)
        with ordinality as u (meter, quantity, dimensions, price_id, percent_off, tokens, line)
    )
  from billing.price_items(p_user_id, p_items, coalesce(p_as_of, now())) as p
$$;

comment on function public.quote_usage(uuid, jsonb, timestamptz) is
'The price of usage items for a user without charging (an estimate for a hold): total tokens '
'and one object per item (meter, quantity, dimensions, price_id, percent_off, tokens). Counts '
'the period''s usage so far for graduated prices. 22023 on bad items, TBPRC without a price.';

revoke all on function public.quote_usage(uuid, jsonb, timestamptz) from public, anon, authenticated;
grant execute on function public.quote_usage(uuid, jsonb, timestamptz) to service_role;

create function public.usage_summary(
  p_user_id uuid,
  p_from timestamptz default null,
  p_to timestamptz default null,
  p_group_by text default null
)
returns table (meter text, unit text, dimension text, quantity bigint, tokens bigint, records bigint)
language plpgsql stable
security invoker
set search_path = ''
as $$
begin
  if p_to <= p_from then
    raise exception using errcode = '22023', message = 'p_from must be before p_to';
  end if;
  if p_group_by is not null and p_group_by !~ '^[a-z0-9_]{1,64}$' then
    raise exception using errcode = '22023', message = 'p_group_by must be a dimension name ([a-z0-9_], 1..64)';
  end if;
  return query
  select r.meter_code, m.unit, r.dimensions ->> p_group_by, sum(r.quantity)::bigint,
    sum(r.tokens)::bigint, count(*)
  from billing.usage_records as r
  inner join billing.meters as m on r.meter_code = m.code
  where r.user_id = p_user_id
    and r.created_at >= coalesce(p_from, date_trunc('month', now(), 'UTC'))
    and r.created_at < coalesce(p_to, 'infinity')
  group by r.meter_code, m.unit, r.dimensions ->> p_group_by
  order by r.meter_code, 3 nulls first;
end;
$$;

comment on function public.usage_summary(uuid, timestamptz, timestamptz, text) is
'A user''s usage from p_from (inclusive; null: this calendar month, UTC) to p_to (exclusive; '
'null: open): quantity, tokens and record count per meter, and per value of the dimension '
'p_group_by when given. Security invoker: service_role reads the records itself.';

revoke all on function public.usage_summary(uuid, timestamptz, timestamptz, text) from public, anon, authenticated;
grant execute on function public.usage_summary(uuid, timestamptz, timestamptz, text) to service_role;

create function public.my_usage(
  p_from timestamptz default null, p_to timestamptz default null, p_group_by text default null
)
returns table (meter text, unit text, dimension text, quantity bigint, tokens bigint, records bigint)
language plpgsql stable
security invoker
set search_path = ''
as $$
begin
  if p_to <= p_from then
    raise exception using errcode = '22023', message = 'p_from must be before p_to';
  end if;
  if p_group_by is not null and p_group_by !~ '^[a-z0-9_]{1,64}$' then
    raise exception using errcode = '22023', message = 'p_group_by must be a dimension name ([a-z0-9_], 1..64)';
  end if;
  -- RLS keeps the records to the caller's own; the filter lets the index do the work.
  return query
  select r.meter_code, m.unit, r.dimensions ->> p_group_by, sum(r.quantity)::bigint,
    sum(r.tokens)::bigint, count(*)
  from billing.usage_records as r
  inner join billing.meters as m on r.meter_code = m.code
  where r.user_id = (select auth.uid())
    and r.created_at >= coalesce(p_from, date_trunc('month', now(), 'UTC'))
    and r.created_at < coalesce(p_to, 'infinity')
  group by r.meter_code, m.unit, r.dimensions ->> p_group_by
  order by r.meter_code, 3 nulls first;
end;
$$;

comment on function public.my_usage(timestamptz, timestamptz, text) is
'The signed-in user''s own usage summary (as usage_summary), read through RLS: security '
'invoker, for authenticated.';

revoke all on function public.my_usage(timestamptz, timestamptz, text) from public, anon;
grant execute on function public.my_usage(timestamptz, timestamptz, text) to authenticated;

insert into billing.schema_migrations (version, name) values ('20261202500000', 'rate_cards');
