-- Migration: MRR over time, and the token flow by period.
--
-- Purpose: an operator asks "what is MRR, what moved it, how many churned" for any month, and
-- "how many tokens were granted, used and expired" for any period. billing.subscriptions holds
-- only each subscription's latest state, and a late or out-of-order delivery never reaches it
-- (it is stale there). So every customer.subscription.* event stored (whatever its outcome:
-- applied, stale or parked; never a duplicate, a connected account's or another mode's) leaves
-- the state it describes in billing.subscription_states at Stripe's created time, and a state
-- lasts until the next one of its subscription (ordered by created, then by how final the status
-- is, then by event id: same-second events order the same way whatever their arrival). The
-- token flow reads the ledger by a BRIN index on created_at: a period costs what its entries
-- cost, however long the history.
--
-- MRR of a subscription, stated: for each item, unit_amount x quantity per interval, normalized
-- to a month exactly (month / interval_count; year / (12 x interval_count); week x 52 / 12;
-- day x 365 / 12), summed; a coupon on the subscription (`discount.coupon`, or the first
-- expanded object of `discounts`) applies its percent_off, or its amount_off normalized like the
-- first item; rounded half up to a whole minor unit per subscription, never below 0. Counted
-- only while the status is active or past_due (trialing, incomplete, paused, unpaid, canceled:
-- 0). Tiered prices (no unit_amount) count at the plan's catalog price when the price maps to a
-- plan, else 0. MRR is per customer: a user's subscriptions (through billing.customers) sum.
-- Objects: billing.subscription_states, billing.subscription_mrr_of(), trigger
--   tg_stripe_events__record_subscription_state, public.mrr_report(),
--   public.token_flow_report(), index ledger_entries_created_at_brin.

create table billing.subscription_states (
  event_id text primary key references billing.stripe_events (id),
  subscription_id text not null,
  stripe_customer_id text,
  status text not null,
  status_rank smallint not null,
  currency text not null,
  mrr_cents bigint not null,
  stripe_price_id text,
  at timestamptz not null,
  constraint subscription_states_mrr_not_negative check (mrr_cents >= 0),
  constraint subscription_states_currency_format check (currency ~ '^[a-z]{3}$')
);

create index subscription_states_subscription_idx on billing.subscription_states (
  subscription_id, at, status_rank, event_id
);

comment on table billing.subscription_states is
'What each subscription was worth a month after each of its stored customer.subscription.* '
'events, at Stripe''s created time of the event; a state lasts until the next one of its '
'subscription. Written when the event is stored; read by mrr_report().';
comment on column billing.subscription_states.event_id is
'The customer.subscription.* event whose object this state is.';
comment on column billing.subscription_states.subscription_id is 'The subscription (sub_...).';
comment on column billing.subscription_states.stripe_customer_id is 'Its customer (cus_...).';
comment on column billing.subscription_states.status is 'Stripe''s status in the event.';
comment on column billing.subscription_states.currency is 'ISO currency code, lowercase.';
comment on column billing.subscription_states.stripe_price_id is 'The first item''s price.';
comment on column billing.subscription_states.status_rank is
'How final the status is (incomplete 0 .. canceled 7): orders same-second events.';
comment on column billing.subscription_states.mrr_cents is
'Monthly recurring revenue in the currency''s minor unit (see the migration header for the '
'normalization and rounding); 0 unless the status is active or past_due.';
comment on column billing.subscription_states.at is 'Stripe''s created time of the event.';

alter table billing.subscription_states enable row level security;
-- No policy: service role only.

revoke all on billing.subscription_states from public, anon, authenticated, service_role;
grant select on billing.subscription_states to service_role;

-- The monthly amount of a Stripe subscription object, normalized and rounded as stated above;
-- null when the object is not a subscription or has no priced item.
create function billing.subscription_mrr_of(
  p_subscription jsonb,
  out mrr_cents bigint,
  out currency text,
  out stripe_price_id text
)
language plpgsql stable
set search_path = ''
as $$
declare
  v_item jsonb;
  v_price jsonb;
  -- The monthly amount as the exact fraction v_num / v_den; one division at the end.
  v_num numeric := 0;
  v_den numeric := 1;
  v_months_num numeric;
  v_months_den numeric;
  v_first_num numeric;
  v_first_den numeric;
  v_unit numeric;
  v_coupon jsonb;
  v_priced boolean := false;
begin
  if p_subscription ->> 'object' is distinct from 'subscription' then
    return;
  end if;
  currency := lower(p_subscription ->> 'currency');
  for v_item in
    select i.value from jsonb_array_elements(
      case jsonb_typeof(p_subscription #> '{items,data}')
        when 'array' then p_subscription #> '{items,data}' else '[]'
      end
    ) as i (value)
  loop
    v_price := coalesce(v_item -> 'price', v_item -> 'plan');
    if jsonb_typeof(v_price) is distinct from 'object' then
      continue;
    end if;
    -- An interval in months, as a fraction: a year is 12, a week 12/52, a day 12/365.
    select x.n, x.d into v_months_num, v_months_den
    from (
      values ('month', 1, 1), ('year', 12, 1), ('week', 12, 52), ('day', 12, 365)
    ) as x (unit, n, d)
    where x.unit = coalesce(v_price #>> '{recurring,interval}', v_price ->> 'interval');
    v_months_num := v_months_num * coalesce(
      (v_price #>> '{recurring,interval_count}')::numeric,
      (v_price ->> 'interval_count')::numeric,
      1
    );
    if v_months_num is null or v_months_num <= 0 then
      continue;
    end if;
    v_unit := coalesce((v_price ->> 'unit_amount')::numeric, (v_price ->> 'amount')::numeric);
    if v_unit is null then
      -- Tiered: the catalog price of the plan the price maps to, else nothing.
      select p.price_cents into v_unit
      from billing.products as p
      where p.stripe_price_id = v_price ->> 'id' and p.kind = 'plan';
    end if;
    stripe_price_id := coalesce(stripe_price_id, v_price ->> 'id');
    v_first_num := coalesce(v_first_num, v_months_num);
    v_first_den := coalesce(v_first_den, v_months_den);
    currency := coalesce(currency, lower(v_price ->> 'currency'));
    -- v_num/v_den + unit x quantity / (months_num / months_den)
    v_num := v_num * v_months_num
      + coalesce(v_unit, 0) * coalesce((v_item ->> 'quantity')::numeric, 1) * v_months_den
      * v_den;
    v_den := v_den * v_months_num;
    v_priced := true;
  end loop;
  if not v_priced then
    return;
  end if;

  v_coupon := coalesce(
    p_subscription #> '{discount,coupon}',
    (
      select d.value -> 'coupon'
      from jsonb_array_elements(
        case jsonb_typeof(p_subscription -> 'discounts')
          when 'array' then p_subscription -> 'discounts' else '[]'
        end
      ) with ordinality as d (value, n)
      where jsonb_typeof(d.value) = 'object'
      order by d.n
      limit 1
    )
  );
  if jsonb_typeof(v_coupon) = 'object' then
    if v_coupon ->> 'percent_off' is not null then
      v_num := v_num * (100 - (v_coupon ->> 'percent_off')::numeric);
      v_den := v_den * 100;
    elsif v_coupon ->> 'amount_off' is not null
      and lower(v_coupon ->> 'currency') is not distinct from currency then
      -- amount_off per invoice, normalized like the first item.
      v_num := v_num * v_first_num
        - (v_coupon ->> 'amount_off')::numeric * v_first_den * v_den;
      v_den := v_den * v_first_num;
    end if;
  end if;
  mrr_cents := greatest(round(v_num / v_den), 0)::bigint;
  currency := coalesce(currency, 'usd');
end;
$$;

comment on function billing.subscription_mrr_of(jsonb) is
'The monthly recurring amount of a Stripe subscription object (items normalized to a month, the '
'coupon applied, rounded half up), its currency and first price; null for another object.';

revoke all on function billing.subscription_mrr_of(jsonb) from public;

create function billing.record_subscription_state(p_event billing.stripe_events)
returns void
language plpgsql
set search_path = ''
as $$
declare
  v_object jsonb := p_event.payload #> '{data,object}';
  v_status text := v_object ->> 'status';
  v_mrr record;
begin
  if p_event.type not like 'customer.subscription.%'
    or p_event.payload ->> 'account' is not null
    or v_object ->> 'object' is distinct from 'subscription'
    or v_status is null
    or v_object ->> 'id' is null then
    return;
  end if;
  select * into v_mrr from billing.subscription_mrr_of(v_object);
  if v_mrr.currency is null then
    return;
  end if;
  insert into billing.subscription_states (
    event_id, subscription_id, stripe_customer_id, status, status_rank, currency, mrr_cents,
    stripe_price_id, at
  )
  values (
    p_event.id,
    v_object ->> 'id',
    coalesce(v_object #>> '{customer,id}', v_object ->> 'customer'),
    v_status,
    coalesce(array_position(
      array['incomplete', 'trialing', 'active', 'past_due', 'unpaid', 'paused',
        'incomplete_expired', 'canceled'],
      v_status
    ) - 1, 0),
    v_mrr.currency,
    case when v_status in ('active', 'past_due') then v_mrr.mrr_cents else 0 end,
    v_mrr.stripe_price_id,
    p_event.created
  )
  on conflict (event_id) do nothing;
end;
$$;

comment on function billing.record_subscription_state(billing.stripe_events) is
'Keeps the state a stored customer.subscription.* event describes in '
'billing.subscription_states (not for a connected account''s event).';

revoke all on function billing.record_subscription_state(billing.stripe_events) from public;

create function billing.tg_stripe_events__record_subscription_state() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  perform billing.record_subscription_state(new);
  return null;
end;
$$;

comment on function billing.tg_stripe_events__record_subscription_state() is
'After a customer.subscription.* event is stored: billing.record_subscription_state().';

revoke all on function billing.tg_stripe_events__record_subscription_state() from public;

create trigger tg_stripe_events__record_subscription_state
after insert on billing.stripe_events
for each row
when (new.type like 'customer.subscription.%')
execute function billing.tg_stripe_events__record_subscription_state();

-- Subscription events stored before this migration.
select billing.record_subscription_state(e)
from billing.stripe_events as e
where e.type like 'customer.subscription.%'
order by e.created, e.id;

-- Reports -------------------------------------------------------------------------------------

create function public.mrr_report(
  p_from timestamptz,
  p_to timestamptz,
  p_currency text default null
)
returns table (
  month_start timestamptz,
  currency text,
  mrr_start_cents bigint,
  mrr_end_cents bigint,
  new_cents bigint,
  expansion_cents bigint,
  contraction_cents bigint,
  churned_cents bigint,
  subscribers_start bigint,
  subscribers_end bigint,
  new_subscribers bigint,
  churned_subscribers bigint,
  churn_rate_bp bigint,
  arpu_cents bigint,
  ltv_cents bigint
)
language plpgsql stable
security invoker
-- Reports plan row counts they cannot know (a period, a history): JIT would compile for
-- seconds to save milliseconds.
set jit = off
set search_path = ''
as $$
begin
  if p_from is null or p_to is null or p_to <= p_from then
    raise exception 'p_to must be later than p_from, got % .. %',
      coalesce(p_from::text, 'null'), coalesce(p_to::text, 'null')
      using errcode = '22023';
  end if;
  if p_to - p_from > interval '10 years' then
    raise exception 'a report spans at most 10 years, got %', p_to - p_from
      using errcode = '22023';
  end if;

  return query
  with months as (
    -- Calendar months of UTC, whatever the session's time zone.
    select
      m at time zone 'UTC' as t0,
      (m + interval '1 month') at time zone 'UTC' as t1
    from generate_series(
      date_trunc('month', p_from at time zone 'UTC'),
      (p_to at time zone 'UTC') - interval '1 microsecond',
      interval '1 month'
    ) as m
  ),

  -- Each state lasts until the next one of its subscription; same-second states order by how
  -- final the status is, then by event id.
  states as (
    select
      st.*,
      coalesce(c.user_id::text, st.stripe_customer_id, st.subscription_id) as payer,
      lead(st.at) over (
        partition by st.subscription_id order by st.at, st.status_rank, st.event_id
      ) as until
    from billing.subscription_states as st
    left join billing.customers as c on c.stripe_customer_id = st.stripe_customer_id
    where p_currency is null or st.currency = lower(p_currency)
  ),

  -- What each payer (a user, or the customer when no user is linked) pays a month at the
  -- month's start and end, per currency: their subscriptions sum.
  worth as (
    select mo.t0, x.edge, st.payer, st.currency, sum(st.mrr_cents) as cents
    from months as mo
    cross join lateral (values (mo.t0, 'start'), (mo.t1, 'end')) as x (at, edge)
    inner join states as st
      on st.at <= x.at and (st.until is null or st.until > x.at)
    group by mo.t0, x.edge, st.payer, st.currency
  ),

  moves as (
    select
      coalesce(s.t0, e.t0) as t0,
      coalesce(s.currency, e.currency) as currency,
      coalesce(s.cents, 0) as a,
      coalesce(e.cents, 0) as b
    from (select * from worth where edge = 'start') as s
    full join (select * from worth where edge = 'end') as e
      on e.t0 = s.t0 and e.payer = s.payer and e.currency = s.currency
  ),

  totals as (
    select
      mv.t0,
      mv.currency,
      sum(mv.a)::bigint as mrr_start,
      sum(mv.b)::bigint as mrr_end,
      sum(case when mv.a = 0 and mv.b > 0 then mv.b else 0 end)::bigint as new_c,
      sum(case when mv.a > 0 and mv.b > mv.a then mv.b - mv.a else 0 end)::bigint as expansion,
      sum(case when mv.b > 0 and mv.b < mv.a then mv.a - mv.b else 0 end)::bigint as contraction,
      sum(case when mv.a > 0 and mv.b = 0 then mv.a else 0 end)::bigint as churned,
      count(*) filter (where mv.a > 0) as subs_start,
      count(*) filter (where mv.b > 0) as subs_end,
      count(*) filter (where mv.a = 0 and mv.b > 0) as subs_new,
      count(*) filter (where mv.a > 0 and mv.b = 0) as subs_churned
    from moves as mv
    group by mv.t0, mv.currency
  )

  select
    t.t0,
    t.currency,
    t.mrr_start,
    t.mrr_end,
    t.new_c,
    t.expansion,
    t.contraction,
    t.churned,
    t.subs_start,
    t.subs_end,
    t.subs_new,
    t.subs_churned,
    case when t.subs_start > 0 then round(10000.0 * t.subs_churned / t.subs_start)::bigint end,
    case when t.subs_end > 0 then round(t.mrr_end::numeric / t.subs_end)::bigint end,
    -- ARPU / churn rate = (end MRR / end subscribers) / (churned / start subscribers): one
    -- division of integers, so the half-up rounding is exact.
    case
      when t.subs_start > 0 and t.subs_churned > 0 and t.subs_end > 0
        then round(
          (t.mrr_end::numeric * t.subs_start) / (t.subs_end * t.subs_churned)
        )::bigint
    end
  from totals as t
  where t.mrr_start > 0 or t.mrr_end > 0
  order by t.t0, t.currency;
end;
$$;

comment on function public.mrr_report(timestamptz, timestamptz, text) is
'MRR by calendar month (UTC) from p_from''s month to p_to, per currency (or only p_currency): '
'MRR at the month''s start and end, its movements per user (new: from 0; expansion; '
'contraction; churned: to 0), subscribers at start and end, new and churned subscribers, '
'churn rate in basis points (churned / subscribers at start, rounded half up), ARPU (end MRR / '
'end subscribers) and LTV (ARPU / monthly churn rate: ARPU x start / churned; null without '
'churn), in minor units rounded half up. Service role only.';

revoke all on function public.mrr_report(timestamptz, timestamptz, text)
from public, anon, authenticated;
grant execute on function public.mrr_report(timestamptz, timestamptz, text) to service_role;

create index ledger_entries_created_at_brin on billing.ledger_entries
using brin (created_at) with (pages_per_range = 32);

create function public.token_flow_report(
  p_from timestamptz,
  p_to timestamptz,
  p_granularity text default 'month'
)
returns table (period_start timestamptz, kind text, entries bigint, tokens bigint)
language plpgsql stable
security invoker
set jit = off
set search_path = ''
as $$
begin
  if p_granularity is null or p_granularity not in ('day', 'week', 'month') then
    raise exception 'p_granularity must be day, week or month, got %',
      coalesce(quote_literal(p_granularity), 'null')
      using errcode = '22023';
  end if;
  if p_from is null or p_to is null or p_to <= p_from then
    raise exception 'p_to must be later than p_from, got % .. %',
      coalesce(p_from::text, 'null'), coalesce(p_to::text, 'null')
      using errcode = '22023';
  end if;
  return query
  select
    date_trunc(p_granularity, e.created_at, 'UTC'),
    e.kind,
    count(*),
    sum(e.amount)::bigint
  from billing.ledger_entries as e
  where e.created_at >= p_from and e.created_at < p_to
  group by 1, 2
  order by 1, 2;
end;
$$;

comment on function public.token_flow_report(timestamptz, timestamptz, text) is
'Tokens that moved in [p_from, p_to), by period (day, week or month, UTC) and ledger kind: '
'entries and their sum (credits positive: purchase, subscription, signup, ...; debits negative: '
'usage, expiry, clawback, dispute). Breakage is the expiry row. Service role only.';

revoke all on function public.token_flow_report(timestamptz, timestamptz, text)
from public, anon, authenticated;
grant execute on function public.token_flow_report(timestamptz, timestamptz, text)
to service_role;

insert into billing.schema_migrations (version, name) values ('20261202600200', 'mrr');
