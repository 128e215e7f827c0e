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
--   billing.usage_records (+ append-only trigger), billing.usage_period(), billing.rate(),
--   billing.read_items(), billing.price_items(), public.quote_usage(), public.usage_summary(),
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
--      the same meter and dimension value (earlier items of the same call included). The
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
  price_id bigint not null references billing.prices (id),
  percent_off integer,
  tokens bigint not null,
  entry_id bigint,
  reservation_id uuid,
  created_at timestamptz not null default now(),
  constraint usage_records_key_line_unique unique (idempotency_key, line),
  constraint usage_records_amounts check (quantity >= 0 and tokens >= 0 and line >= 1)
);

-- Graduated and rounded prices sum a period's quantity per user, meter and dimension value.
create index usage_records_period_idx on billing.usage_records (
  user_id, meter_code, dimension_value, created_at
) include (quantity);
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

-- Pricing ----------------------------------------------------------------------------------------

create function billing.usage_period(p_user_id uuid, p_as_of timestamptz)
returns table (period_start timestamptz, period_end timestamptz)
language sql stable
set search_path = ''
as $$
  select coalesce(s.current_period_start, date_trunc('month', p_as_of, 'UTC')),
    coalesce(s.current_period_end, date_trunc('month', p_as_of, 'UTC') + interval '1 month')
  from (select 1) as one
  left join lateral (
    select sub.current_period_start, sub.current_period_end
    from billing.subscriptions as sub
    where sub.user_id = p_user_id
      and sub.status in ('active', 'trialing', 'past_due')
      and sub.current_period_start <= p_as_of and p_as_of < sub.current_period_end
    order by sub.current_period_start desc
    limit 1
  ) as s on true
$$;

comment on function billing.usage_period(uuid, timestamptz) is
'The billing period containing p_as_of: the live subscription''s current period, else the '
'calendar month (UTC). Graduated tiers accumulate over it.';

revoke all on function billing.usage_period(uuid, timestamptz) from public;

create function billing.round_div(p_numerator numeric, p_divisor bigint, p_rounding text)
returns numeric
language sql immutable
set search_path = ''
as $$
  select case when p_rounding = 'down' then div(p_numerator, p_divisor)
    else div(p_numerator + p_divisor - 1, p_divisor) end
$$;

comment on function billing.round_div(numeric, bigint, text) is
'Integer division of a non-negative integer, rounded up or down (no fractions are ever kept).';

revoke all on function billing.round_div(numeric, bigint, text) from public;

create function billing.rate(p_price billing.prices, p_quantity numeric) returns numeric
language plpgsql immutable
set search_path = ''
as $$
declare
  v_units numeric;
  v_flat numeric;
begin
  if p_quantity <= 0 then
    return 0;
  end if;
  if p_price.scheme = 'per_unit' then
    return billing.round_div(p_quantity * p_price.unit_amount, p_price.unit_divisor, p_price.rounding);
  elsif p_price.scheme = 'package' then
    return billing.round_div(p_quantity, p_price.package_size, p_price.rounding) * p_price.unit_amount;
  elsif p_price.scheme = 'graduated' then
    select
      coalesce(sum(t.units * t.unit_amount), 0),
      coalesce(sum(t.flat_amount) filter (where t.units > 0), 0)
    into v_units, v_flat
    from (
      select
        greatest(least(p_quantity, coalesce(tier.up_to, p_quantity)) - tier.lower_bound, 0) as units,
        tier.unit_amount,
        tier.flat_amount
      from (
        select
          (e.value ->> 'up_to')::numeric as up_to,
          coalesce(lag((e.value ->> 'up_to')::numeric) over (order by e.ordinality), 0) as lower_bound,
          (e.value ->> 'unit_amount')::numeric as unit_amount,
          coalesce((e.value ->> 'flat_amount')::numeric, 0) as flat_amount
        from jsonb_array_elements(p_price.tiers) with ordinality as e (value, ordinality)
      ) as tier
    ) as t;
    return billing.round_div(v_units, p_price.unit_divisor, p_price.rounding) + v_flat;
  end if;
  -- volume: the tier the whole quantity falls in prices every unit.
  select
    billing.round_div(p_quantity * (e.value ->> 'unit_amount')::numeric, p_price.unit_divisor, p_price.rounding)
    + coalesce((e.value ->> 'flat_amount')::numeric, 0)
  into v_units
  from jsonb_array_elements(p_price.tiers) with ordinality as e (value, ordinality)
  where e.value ->> 'up_to' is null or (e.value ->> 'up_to')::numeric >= p_quantity
  order by e.ordinality
  limit 1;
  return v_units;
end;
$$;

comment on function billing.rate(billing.prices, numeric) is
'F(q): the tokens of quantity q under one price version, rounded once as the price says '
'(per_unit, package, graduated, volume; see the migration header).';

revoke all on function billing.rate(billing.prices, numeric) from public;

create function billing.read_items(p_items jsonb)
returns table (line int, meter_code text, quantity bigint, dimensions jsonb)
language plpgsql immutable
set search_path = ''
as $$
declare
  v_item jsonb;
  v_line int := 0;
  v_dimension record;
begin
  if p_items is null or jsonb_typeof(p_items) <> 'array' or jsonb_array_length(p_items) = 0
    or jsonb_array_length(p_items) > 100 then
    raise exception using
      errcode = '22023',
      message = 'p_items must be a JSON array of 1 to 100 items {meter, quantity, dimensions}';
  end if;
  for v_item in select value from jsonb_array_elements(p_items) loop
    v_line := v_line + 1;
    if jsonb_typeof(v_item) <> 'object'
      or jsonb_typeof(v_item -> 'meter') is distinct from 'string'
      or jsonb_typeof(v_item -> 'quantity') is distinct from 'number'
      or (v_item ->> 'quantity')::numeric <> trunc((v_item ->> 'quantity')::numeric)
      or (v_item ->> 'quantity')::numeric not between 0 and 1000000000000
      or coalesce(jsonb_typeof(v_item -> 'dimensions'), 'object') not in ('object', 'null') then
      raise exception using
        errcode = '22023',
        message = format(
          'p_items[%s] must be {"meter": text, "quantity": an integer 0..10^12, "dimensions": {...}}',
          v_line - 1);
    end if;
    for v_dimension in select * from jsonb_each(coalesce(nullif(v_item -> 'dimensions', 'null'), '{}')) loop
      if jsonb_typeof(v_dimension.value) <> 'string' or length(v_dimension.value #>> '{}') > 200
        or length(v_dimension.key) > 64 then
        raise exception using
          errcode = '22023',
          message = format('p_items[%s].dimensions.%s must be a text of at most 200 characters',
            v_line - 1, left(v_dimension.key, 64));
      end if;
    end loop;
    line := v_line;
    meter_code := v_item ->> 'meter';
    quantity := (v_item ->> 'quantity')::bigint;
    dimensions := coalesce(nullif(v_item -> 'dimensions', 'null'), '{}');
    return next;
  end loop;
end;
$$;

comment on function billing.read_items(jsonb) is
'The usage items of a call, checked: 1..100 objects {meter, quantity (integer 0..10^12), '
'dimensions (object of texts)}; 22023 naming the item otherwise.';

revoke all on function billing.read_items(jsonb) from public;

create function billing.price_items(p_user_id uuid, p_items jsonb, p_as_of timestamptz)
returns table (
  line int,
  meter_code text,
  quantity bigint,
  dimensions jsonb,
  dimension_value text,
  price_id bigint,
  percent_off integer,
  tokens bigint
)
language plpgsql stable
set search_path = ''
as $$
declare
  v_item record;
  v_meter billing.meters;
  v_price billing.prices;
  v_term record;
  v_period_start timestamptz;
  v_used numeric;
  v_before numeric;
  v_after numeric;
  v_charge numeric;
  -- Quantities of earlier items of this call, per meter and dimension value.
  v_in_call jsonb := '{}';
  v_key text;
  v_value text;
begin
  for v_item in select * from billing.read_items(p_items) loop
    select * into v_meter from billing.meters as m where m.code = v_item.meter_code;
    if not found then
      raise exception using
        errcode = '22023',
        message = format('p_items[%s].meter: unknown meter %L', v_item.line - 1, v_item.meter_code);
    end if;
    v_value := coalesce(v_item.dimensions ->> v_meter.dimension, '');

    select t.percent_off, t.override_price_id into v_term
    from billing.customer_terms as t
    where t.user_id = p_user_id
      and (t.meter_code = v_meter.code or t.meter_code is null)
      and t.valid_from <= p_as_of and (t.valid_until is null or p_as_of < t.valid_until)
    order by t.meter_code is null, t.valid_from desc, t.id desc
    limit 1;

    if v_term.override_price_id is not null then
      select * into v_price from billing.prices as p where p.id = v_term.override_price_id;
    else
      select * into v_price
      from billing.prices as p
      where p.meter_code = v_meter.code and not p.custom
        and p.dimension_value in (v_value, '*') and p.effective_from <= p_as_of
      order by p.dimension_value = '*', p.effective_from desc, p.id desc
      limit 1;
      if not found then
        raise exception using
          errcode = 'TBPRC',
          message = format('meter %s has no price for %s at %s', v_meter.code,
            coalesce(v_meter.dimension || ' = ' || quote_literal(v_value), 'its usage'), p_as_of);
      end if;
    end if;

    if v_price.scheme = 'graduated' or v_price.unit_divisor > 1 or v_price.package_size > 1 then
      -- Accumulating: what this period used before, so the call pays its share of F exactly.
      if v_period_start is null then
        select u.period_start into v_period_start from billing.usage_period(p_user_id, p_as_of) as u;
      end if;
      v_key := v_meter.code || '/' || v_value;
      select coalesce(sum(r.quantity), 0) into v_used
      from billing.usage_records as r
      where r.user_id = p_user_id and r.meter_code = v_meter.code
        and r.dimension_value = v_value
        and r.created_at >= v_period_start and r.created_at <= p_as_of;
      v_before := v_used + coalesce((v_in_call ->> v_key)::numeric, 0);
      v_after := v_before + v_item.quantity;
      v_in_call := v_in_call || jsonb_build_object(v_key, v_after - v_used);
      v_before := billing.rate(v_price, v_before);
      v_after := billing.rate(v_price, v_after);
      if v_term.percent_off is not null then
        v_before := v_before - div(v_before * v_term.percent_off, 100);
        v_after := v_after - div(v_after * v_term.percent_off, 100);
      end if;
      v_charge := v_after - v_before;
    else
      v_charge := billing.rate(v_price, v_item.quantity);
      if v_term.percent_off is not null then
        v_charge := v_charge - div(v_charge * v_term.percent_off, 100);
      end if;
    end if;
    if v_item.quantity > 0 then
      v_charge := greatest(v_charge, v_price.minimum_tokens);
    end if;

    line := v_item.line;
    meter_code := v_meter.code;
    dimension_value := v_value;
    quantity := v_item.quantity;
    dimensions := v_item.dimensions;
    price_id := v_price.id;
    percent_off := case when v_term.override_price_id is null then v_term.percent_off end;
    tokens := v_charge;
    return next;
  end loop;
end;
$$;

comment on function billing.price_items(uuid, jsonb, timestamptz) is
'Prices each usage item for a user at a time (price version, customer term, period '
'accumulation; see the migration header). Raises 22023 on a bad item or unknown meter, TBPRC '
'when a meter has no price. Reads only; record_usage calls it under the account lock.';

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
    coalesce(sum(p.tokens), 0)::bigint,
    coalesce(jsonb_agg(jsonb_build_object(
      'meter', p.meter_code, 'quantity', p.quantity, 'dimensions', p.dimensions,
      'price_id', p.price_id, 'percent_off', p.percent_off, 'tokens', p.tokens
    ) order by p.line), '[]')
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
  p_from timestamptz,
  p_to timestamptz,
  p_group_by text default null
)
returns table (meter text, unit text, dimension text, quantity bigint, tokens bigint, records bigint)
language plpgsql stable
security invoker
set search_path = ''
as $$
begin
  if p_from is null or p_to is null or p_to <= p_from then
    raise exception using errcode = '22023', message = 'p_from and p_to must be given, p_from before p_to';
  end if;
  if p_group_by is not null and p_group_by !~ '^[a-z0-9_]{1,64}$' then
    raise exception using errcode = '22023', message = 'p_group_by must be a dimension name ([a-z0-9_], 1..64)';
  end if;
  return query
  select r.meter_code, m.unit, r.dimensions ->> p_group_by, sum(r.quantity)::bigint,
    sum(r.tokens)::bigint, count(*)
  from billing.usage_records as r
  inner join billing.meters as m on r.meter_code = m.code
  where r.user_id = p_user_id and r.created_at >= p_from and r.created_at < p_to
  group by r.meter_code, m.unit, r.dimensions ->> p_group_by
  order by r.meter_code, 3 nulls first;
end;
$$;

comment on function public.usage_summary(uuid, timestamptz, timestamptz, text) is
'A user''s usage from p_from (inclusive) to p_to (exclusive): quantity, tokens and record count '
'per meter, and per value of the dimension p_group_by when given. Security invoker: '
'service_role reads the records itself.';

revoke all on function public.usage_summary(uuid, timestamptz, timestamptz, text) from public, anon, authenticated;
grant execute on function public.usage_summary(uuid, timestamptz, timestamptz, text) to service_role;

create function public.my_usage(p_from timestamptz, p_to timestamptz, p_group_by text default null)
returns table (meter text, unit text, dimension text, quantity bigint, tokens bigint, records bigint)
language plpgsql stable
security invoker
set search_path = ''
as $$
begin
  if p_from is null or p_to is null or p_to <= p_from then
    raise exception using errcode = '22023', message = 'p_from and p_to must be given, p_from before p_to';
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
  where r.user_id = (select auth.uid()) and r.created_at >= p_from and r.created_at < p_to
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
