-- Migration: what a plan does when its tokens run out (overage strategies), low-balance
-- thresholds, and auto top-up requests.
--
-- Purpose: each plan says, in the database, what a deduct that the balance cannot cover does, in
-- the same call that would refuse it:
--   block        refused: insufficient_funds (as before);
--   throttle     applied, taking the balance below zero by at most overage_allowance tokens per
--                period, and the answer carries retry_after_ms (throttle_delay_ms): the caller
--                waits that long before its next call; past the allowance, refused;
--   auto_top_up  refused like block; the top-up is bought when available falls to the
--                auto_top_up_below threshold (below);
--   postpaid     always applied (unlimited: Enterprise); the balance may go negative for this
--                plan alone, and the tokens taken below zero in a period are invoiced after it
--                ends (public.postpaid_due, public.mark_postpaid_invoiced).
-- Thresholds: alert_thresholds (percent of the plan's tokens per period, e.g. {20, 0}) raise one
-- notification per threshold per period when available falls to or below it (low_balance;
-- out_of_tokens at 0). auto_top_up_below (percent) raises an auto top-up request when it is
-- crossed (at most auto_top_up_max_per_period per period, none while one is pending, none once
-- turned off for the user); the service claims it, charges the saved card off-session for
-- auto_top_up_pack and reports the outcome; payment_intent.succeeded credits it.
-- Objects: columns of billing.products (overage_strategy, overage_allowance, throttle_delay_ms,
--   alert_thresholds, auto_top_up_pack, auto_top_up_below, auto_top_up_max_per_period,
--   postpaid_unit_amount), billing.accounts.alert_levels and its triggers,
--   billing.overage_periods, billing.auto_top_up_preferences, billing.auto_top_ups,
--   billing.plan_alert_levels(), billing.usage_period_start(), billing.note_crossings(),
--   billing.debit_overage(), public.claim_auto_top_ups(), public.finish_auto_top_up(),
--   public.set_auto_top_up(), public.postpaid_due(), public.mark_postpaid_invoiced();
--   replaces public.deduct_tokens() (new column retry_after_ms), billing.check_invariants()
--   (overage entries may end below zero), billing.apply_payment_intent_event() (an auto
--   top-up's intent not recorded yet parks instead of being ignored).
--
-- Cost: the deduct's statement is unchanged but for returning reserved and alert_levels; a plan
-- without thresholds pays one null test, one with thresholds a loop over its levels (two or
-- three) in plpgsql; only a crossing or a refusal runs a query more.

alter table billing.products
add column overage_strategy text not null default 'block',
add column overage_allowance bigint not null default 0,
add column throttle_delay_ms integer not null default 0,
add column alert_thresholds integer[] not null default '{}',
add column auto_top_up_pack text references billing.products (code) on update cascade,
add column auto_top_up_below integer,
add column auto_top_up_max_per_period integer not null default 3,
add column postpaid_unit_amount integer,
add constraint products_overage_strategy_known check (
  overage_strategy in ('block', 'throttle', 'auto_top_up', 'postpaid')
),
add constraint products_overage_allowance_valid check (overage_allowance >= 0),
add constraint products_throttle_delay_valid check (throttle_delay_ms between 0 and 3600000),
add constraint products_alert_thresholds_valid check (
  0 <= all(alert_thresholds) and 100 >= all(alert_thresholds) and cardinality(alert_thresholds) <= 5
),
add constraint products_auto_top_up_valid check (
  overage_strategy <> 'auto_top_up'
  or (auto_top_up_pack is not null and auto_top_up_below between 0 and 100)
),
add constraint products_auto_top_up_max_valid check (auto_top_up_max_per_period between 0 and 100),
add constraint products_postpaid_unit_amount_valid check (postpaid_unit_amount >= 0);

comment on column billing.products.overage_strategy is
'Plans: what a deduct the balance cannot cover does: block (refused), throttle (applied within '
'overage_allowance per period, with a delay), auto_top_up (refused; a top-up is bought at the '
'threshold), postpaid (always applied; invoiced after the period).';
comment on column billing.products.overage_allowance is
'throttle: tokens a period may take below zero.';
comment on column billing.products.throttle_delay_ms is
'throttle: the retry_after_ms a deduct taken below zero answers.';
comment on column billing.products.alert_thresholds is
'Percent of the plan''s tokens (the period''s grant) at which the user is notified once per '
'period, e.g. {20, 0}: at or below 20% (low_balance) and at 0 (out_of_tokens).';
comment on column billing.products.auto_top_up_pack is 'auto_top_up: the pack it buys.';
comment on column billing.products.auto_top_up_below is
'auto_top_up: percent of the plan''s tokens at or below which a top-up is bought.';
comment on column billing.products.auto_top_up_max_per_period is
'auto_top_up: at most this many top-ups per period.';
comment on column billing.products.postpaid_unit_amount is
'postpaid: the price of 1,000 tokens taken below zero, in the currency''s minor unit; the '
'period''s amount is rounded up to a whole minor unit.';

-- The guide's free plan warns at 20% and at 0 (only when nobody has set thresholds yet).
update billing.products set alert_thresholds = '{20, 0}'
where code = 'free' and alert_thresholds = '{}';

-- Levels and periods --------------------------------------------------------------------------

create function billing.plan_alert_levels(p_plan text) returns bigint[]
language sql stable
set search_path = ''
as $$
  select nullif(
    array(
      select distinct floor(p.tokens * t.percent / 100.0)::bigint as level
      from unnest(p.alert_thresholds || case when p.overage_strategy = 'auto_top_up'
          then array[p.auto_top_up_below] else '{}'::integer[] end) as t (percent)
      order by level desc
    ),
    '{}')
  from billing.products as p
  where p.code = p_plan
$$;

comment on function billing.plan_alert_levels(text) is
'The available-token levels whose crossing the deduct path reports for a plan: its '
'alert_thresholds and auto_top_up_below as tokens (percent of its tokens, rounded down), '
'highest first; null when none.';

revoke all on function billing.plan_alert_levels(text) from public;

alter table billing.accounts
add column alert_levels bigint[];

comment on column billing.accounts.alert_levels is
'The plan''s levels of available tokens (billing.plan_alert_levels) whose downward crossing a '
'deduct reports to billing.note_crossings; null: none. Kept by triggers on plan changes.';

create function billing.tg_accounts__alert_levels() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.alert_levels := billing.plan_alert_levels(new.plan);
  return new;
end;
$$;

comment on function billing.tg_accounts__alert_levels() is
'Sets accounts.alert_levels from the plan when an account opens or changes plan.';

revoke all on function billing.tg_accounts__alert_levels() from public;

create trigger tg_accounts__alert_levels
before insert or update of plan on billing.accounts
for each row execute function billing.tg_accounts__alert_levels();

create function billing.tg_products__alert_levels() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  update billing.accounts as a
  set alert_levels = billing.plan_alert_levels(new.code)
  where a.plan = new.code and a.alert_levels is distinct from billing.plan_alert_levels(new.code);
  return null;
end;
$$;

comment on function billing.tg_products__alert_levels() is
'Recomputes the alert levels of the accounts on a plan whose tokens or thresholds changed.';

revoke all on function billing.tg_products__alert_levels() from public;

create trigger tg_products__alert_levels
after update of tokens, alert_thresholds, overage_strategy, auto_top_up_below on billing.products
for each row execute function billing.tg_products__alert_levels();

-- Accounts that exist already (the free plan's thresholds above).
update billing.accounts as a
set alert_levels = billing.plan_alert_levels(a.plan)
where billing.plan_alert_levels(a.plan) is not null;

create function billing.usage_period_start(p_user_id uuid, p_as_of timestamptz) returns timestamptz
language sql stable
set search_path = ''
as $$
  select coalesce(
    (
      select s.current_period_start
      from billing.subscriptions as s
      where s.user_id = p_user_id
        and s.status in ('active', 'trialing', 'past_due')
        and s.current_period_start <= p_as_of and p_as_of < s.current_period_end
      order by s.current_period_start desc
      limit 1
    ),
    date_trunc('month', p_as_of, 'UTC'))
$$;

comment on function billing.usage_period_start(uuid, timestamptz) is
'The start of the user''s period at p_as_of: the current subscription period''s, else the UTC '
'calendar month''s (as billing.price_items counts usage).';

revoke all on function billing.usage_period_start(uuid, timestamptz) from public;

create table billing.overage_periods (
  user_id uuid not null references billing.accounts (user_id),
  period_start timestamptz not null,
  plan text not null references billing.products (code) on update cascade,
  overage_tokens bigint not null default 0,
  top_ups integer not null default 0,
  invoiced_at timestamptz,
  stripe_invoice_item_id text,
  constraint overage_periods_pkey primary key (user_id, period_start),
  constraint overage_periods_counts_valid check (overage_tokens >= 0 and top_ups >= 0),
  constraint overage_periods_invoiced check ((invoiced_at is null) = (stripe_invoice_item_id is null))
);

comment on table billing.overage_periods is
'Per user and period: the tokens deducts took below zero (throttle, postpaid) and the auto '
'top-ups requested; for postpaid plans, the Stripe invoice item that billed them.';
comment on column billing.overage_periods.user_id is 'The user.';
comment on column billing.overage_periods.period_start is 'The period (billing.usage_period_start).';
comment on column billing.overage_periods.plan is 'The plan of the period''s first overage.';
comment on column billing.overage_periods.overage_tokens is
'Tokens taken below zero in the period (what throttle counts against its allowance, what '
'postpaid invoices).';
comment on column billing.overage_periods.top_ups is 'Auto top-ups requested in the period.';
comment on column billing.overage_periods.invoiced_at is 'postpaid: when the overage was invoiced.';
comment on column billing.overage_periods.stripe_invoice_item_id is
'postpaid: the Stripe invoice item (ii_...) that bills the overage.';

alter table billing.overage_periods enable row level security;
-- No policy: service role only.
revoke all on billing.overage_periods from public, anon, authenticated, service_role;
grant select on billing.overage_periods to service_role;

create table billing.auto_top_up_preferences (
  user_id uuid primary key references billing.accounts (user_id),
  enabled boolean not null,
  reason text,
  updated_at timestamptz not null default now()
);

comment on table billing.auto_top_up_preferences is
'Whether auto top-up is on for a user of an auto_top_up plan (no row: on). A failed or '
'SCA-blocked top-up turns it off with the reason; public.set_auto_top_up turns it on again.';
comment on column billing.auto_top_up_preferences.user_id is 'The user.';
comment on column billing.auto_top_up_preferences.enabled is 'Whether top-ups are bought.';
comment on column billing.auto_top_up_preferences.reason is 'Why it was turned off (or on).';
comment on column billing.auto_top_up_preferences.updated_at is 'When it last changed.';

alter table billing.auto_top_up_preferences enable row level security;
-- No policy: service role only.
revoke all on billing.auto_top_up_preferences from public, anon, authenticated, service_role;
grant select on billing.auto_top_up_preferences to service_role;

create table billing.auto_top_ups (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references billing.accounts (user_id),
  period_start timestamptz not null,
  n integer not null,
  product_code text not null references billing.products (code) on update cascade,
  amount_cents bigint not null,
  currency text not null,
  available_at_crossing bigint not null,
  status text not null default 'pending',
  attempts integer not null default 0,
  locked_until timestamptz,
  stripe_payment_intent_id text unique,
  detail text,
  created_at timestamptz not null default now(),
  decided_at timestamptz,
  constraint auto_top_ups_crossing_key unique (user_id, period_start, n),
  constraint auto_top_ups_status_known check (
    status in ('pending', 'charged', 'failed', 'requires_action')
  ),
  constraint auto_top_ups_decided check ((status = 'pending') = (decided_at is null)),
  constraint auto_top_ups_amount_valid check (amount_cents >= 0 and n >= 1)
);

-- At most one top-up in flight per user: a second crossing while one is pending buys nothing.
create unique index auto_top_ups_one_pending_idx on billing.auto_top_ups (user_id)
where status = 'pending';

comment on table billing.auto_top_ups is
'One row per threshold crossing that buys a top-up (the n-th of its period): the outbox the '
'service claims, charges off-session with the idempotency key tb-auto-top-up-<id> and decides.';
comment on column billing.auto_top_ups.id is 'The request; its Stripe idempotency key is tb-auto-top-up-<id>.';
comment on column billing.auto_top_ups.user_id is 'Whose card is charged.';
comment on column billing.auto_top_ups.period_start is 'The period of the crossing.';
comment on column billing.auto_top_ups.n is 'Which top-up of the period (1..auto_top_up_max_per_period).';
comment on column billing.auto_top_ups.product_code is 'The pack bought.';
comment on column billing.auto_top_ups.amount_cents is 'The pack''s price_cents at the crossing.';
comment on column billing.auto_top_ups.currency is 'The pack''s currency.';
comment on column billing.auto_top_ups.available_at_crossing is 'Tokens available after the crossing deduct.';
comment on column billing.auto_top_ups.status is
'pending (to charge), charged (the PaymentIntent succeeded or is processing; its '
'payment_intent.succeeded credits), failed (declined, no card), requires_action (SCA).';
comment on column billing.auto_top_ups.attempts is 'How many times a worker claimed it.';
comment on column billing.auto_top_ups.locked_until is 'The claiming worker''s lease.';
comment on column billing.auto_top_ups.stripe_payment_intent_id is 'The PaymentIntent (pi_...).';
comment on column billing.auto_top_ups.detail is 'What Stripe answered.';
comment on column billing.auto_top_ups.created_at is 'When the threshold was crossed.';
comment on column billing.auto_top_ups.decided_at is 'When the outcome was reported.';

alter table billing.auto_top_ups enable row level security;
-- No policy: service role only.
revoke all on billing.auto_top_ups from public, anon, authenticated, service_role;
grant select on billing.auto_top_ups to service_role;

-- Crossings -----------------------------------------------------------------------------------

create function billing.note_crossings(p_user_id uuid, p_before bigint, p_after bigint) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_plan billing.products;
  v_pack billing.products;
  v_period timestamptz;
  v_percent integer;
  v_level bigint;
  v_n integer;
begin
  -- The caller holds the account's lock (the deduct's update): crossings of one account are
  -- decided one at a time, so one crossing raises one notification and one top-up.
  select p.* into v_plan
  from billing.accounts as a
  inner join billing.products as p on p.code = a.plan
  where a.user_id = p_user_id;
  v_period := billing.usage_period_start(p_user_id, now());

  foreach v_percent in array v_plan.alert_thresholds loop
    v_level := floor(v_plan.tokens * v_percent / 100.0)::bigint;
    if p_before > v_level and p_after <= v_level then
      perform billing.notify(
        p_user_id,
        case when v_percent = 0 then 'out_of_tokens' else 'low_balance' end,
        case when v_percent = 0
          then format('You are out of tokens on %s: top up to keep going.', v_plan.name)
          else format('%s tokens left: below %s%% of your %s plan''s %s.', greatest(p_after, 0),
            v_percent, v_plan.name, v_plan.tokens)
        end,
        jsonb_build_object('threshold_percent', v_percent, 'threshold_tokens', v_level,
          'available', p_after, 'plan', v_plan.code, 'period_start', v_period),
        format('threshold:%s:%s:%s', p_user_id, v_period, v_percent));
    end if;
  end loop;

  if v_plan.overage_strategy = 'auto_top_up' then
    v_level := floor(v_plan.tokens * v_plan.auto_top_up_below / 100.0)::bigint;
    if p_before > v_level and p_after <= v_level
      and not exists (
        select 1 from billing.auto_top_up_preferences as t where t.user_id = p_user_id and not t.enabled
      )
      and not exists (
        select 1 from billing.auto_top_ups as t where t.user_id = p_user_id and t.status = 'pending'
      ) then
      select p.* into v_pack from billing.products as p
      where p.code = v_plan.auto_top_up_pack and p.kind = 'pack' and p.active;
      if v_pack.code is null then
        return;
      end if;
      insert into billing.overage_periods as o (user_id, period_start, plan, top_ups)
      select p_user_id, v_period, v_plan.code, 1
      where v_plan.auto_top_up_max_per_period >= 1
      on conflict (user_id, period_start) do update
      set top_ups = o.top_ups + 1
      where o.top_ups < v_plan.auto_top_up_max_per_period
      returning o.top_ups into v_n;
      if v_n is not null then
        insert into billing.auto_top_ups (
          user_id, period_start, n, product_code, amount_cents, currency, available_at_crossing
        )
        values (
          p_user_id, v_period, v_n, v_pack.code, coalesce(v_pack.price_cents, 0), v_pack.currency,
          p_after
        );
      end if;
    end if;
  end if;
end;
$$;

comment on function billing.note_crossings(uuid, bigint, bigint) is
'A deduct took available from p_before to p_after: raises the notification of each threshold '
'crossed (to or below it; once per period) and, on an auto_top_up plan, the top-up request of '
'its threshold (none while one is pending, at most the plan''s per period, none when off). The '
'caller holds the account''s lock.';

revoke all on function billing.note_crossings(uuid, bigint, bigint) from public;

-- The deduct ----------------------------------------------------------------------------------

create function billing.debit_overage(
  p_user_id uuid,
  p_amount bigint,
  p_idempotency_key text,
  p_description text,
  p_metadata jsonb,
  p_debited boolean
) returns table (status text, balance bigint, entry_id bigint, retry_after_ms integer)
language plpgsql
set search_path = ''
as $$
declare
  v_balance bigint;
  v_reserved bigint;
  v_plan billing.products;
  v_available bigint;
  v_over bigint;
  v_used bigint;
  v_period timestamptz;
  v_debit record;
begin
  if p_debited then
    -- The key was used before (billing.debit_refused undoes the debit and replays).
    return query select r.status, r.balance, r.entry_id, null::integer
    from billing.debit_refused(p_user_id, p_amount, p_idempotency_key, 'usage', true) as r;
    return;
  end if;
  return query select r.status, r.balance, r.entry_id, null::integer
  from billing.replay_entry(p_idempotency_key, p_user_id, -p_amount, 'usage') as r;
  if found then
    return;
  end if;

  select a.balance, a.reserved into v_balance, v_reserved
  from billing.accounts as a
  where a.user_id = p_user_id
  for no key update;
  if not found then
    return query select 'unknown_account'::text, null::bigint, null::bigint, null::integer;
    return;
  end if;
  select p.* into v_plan
  from billing.accounts as a
  inner join billing.products as p on p.code = a.plan
  where a.user_id = p_user_id;
  v_available := v_balance - v_reserved;

  if v_available >= p_amount then
    -- A credit landed since the deduct's statement: a plain debit now.
    return query select d.status, d.balance, d.entry_id, null::integer
    from billing.debit(p_user_id, p_amount, p_idempotency_key, 'usage', p_description,
      p_metadata) as d;
    perform billing.note_crossings(p_user_id, v_available, v_available - p_amount);
    return;
  end if;

  if v_plan.overage_strategy in ('throttle', 'postpaid') then
    v_over := p_amount - greatest(v_available, 0);
    v_period := billing.usage_period_start(p_user_id, now());
    select o.overage_tokens into v_used
    from billing.overage_periods as o
    where o.user_id = p_user_id and o.period_start = v_period
    for update;
    if v_plan.overage_strategy = 'postpaid'
      or coalesce(v_used, 0) + v_over <= v_plan.overage_allowance then
      insert into billing.overage_periods as o (user_id, period_start, plan, overage_tokens)
      values (p_user_id, v_period, v_plan.code, v_over)
      on conflict (user_id, period_start) do update
      set overage_tokens = o.overage_tokens + excluded.overage_tokens;
      select d.status, d.balance, d.entry_id into v_debit
      from billing.debit(p_user_id, p_amount, p_idempotency_key, 'usage', p_description,
        coalesce(p_metadata, '{}') || jsonb_build_object(
          'overage', v_plan.overage_strategy, 'overage_tokens', v_over,
          'period_start', v_period),
        true) as d;
      perform billing.note_crossings(p_user_id, v_available, v_available - p_amount);
      return query select v_debit.status, v_debit.balance, v_debit.entry_id,
        case when v_plan.overage_strategy = 'throttle' then v_plan.throttle_delay_ms end;
      return;
    end if;
  end if;

  -- block, auto_top_up, or throttle past its allowance: refused. A refused call that would have
  -- crossed a threshold counts as the crossing (a top-up is bought for it).
  perform billing.note_crossings(p_user_id, v_available, v_available - p_amount);
  return query select 'insufficient_funds'::text, v_balance, null::bigint, null::integer;
end;
$$;

comment on function billing.debit_overage(uuid, bigint, text, text, jsonb, boolean) is
'The deduct''s refusal branch: a replayed key (duplicate, TBKEY), no account, or no funds, where '
'the plan''s overage strategy decides: throttle (within the period''s allowance) and postpaid '
'apply it below zero (entry metadata overage), throttle answering retry_after_ms; otherwise '
'insufficient_funds. Thresholds crossed are noted either way.';

revoke all on function billing.debit_overage(uuid, bigint, text, text, jsonb, boolean) from public;

-- The answer gains retry_after_ms: a new row type, so the function is dropped and created again.
drop function public.deduct_tokens(uuid, bigint, text, text, jsonb);

create function public.deduct_tokens(
  p_user_id uuid,
  p_amount bigint,
  p_idempotency_key text,
  p_description text default null,
  p_metadata jsonb default '{}'
) returns table (status text, balance bigint, entry_id bigint, retry_after_ms integer)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_reserved bigint;
  v_levels bigint[];
  v_level bigint;
begin
  if p_amount is null or p_amount <= 0 or p_amount > 1000000000000000
    or p_idempotency_key is null or length(p_idempotency_key) > 255
    or length(btrim(p_idempotency_key)) = 0
    or p_idempotency_key like 'signup:%' or p_idempotency_key like 'expiry:%'
    or p_idempotency_key like 'reservation:%' or p_idempotency_key like 'stripe:%'
    or (p_metadata is not null and jsonb_typeof(p_metadata) <> 'object') then
    perform billing.require_amount('p_amount', p_amount);
    perform billing.require_caller_key('p_idempotency_key', p_idempotency_key);
    perform billing.require_object('p_metadata', p_metadata);
  end if;

  -- One statement: lock and debit the account (usage never takes available below zero here),
  -- then write the entry unless its key exists already.
  with debited as (
    update billing.accounts as a
    set balance = a.balance - p_amount, undrawn = a.undrawn + p_amount, updated_at = now()
    where a.user_id = p_user_id and a.balance - a.reserved >= p_amount
    returning a.balance, a.reserved, a.alert_levels
  ),

  entry as (
    insert into billing.ledger_entries (
      user_id, amount, balance_after, kind, idempotency_key, description, metadata
    )
    select
      p_user_id, -p_amount, debited.balance, 'usage', p_idempotency_key, p_description,
      coalesce(p_metadata, '{}')
    from debited
    on conflict (idempotency_key) do nothing
    returning id
  )

  select debited.balance, debited.reserved, debited.alert_levels, entry.id
  into balance, v_reserved, v_levels, entry_id
  from debited
  left join entry on true;

  if entry_id is not null then
    status := 'applied';
    if v_levels is not null then
      -- A threshold crossed (available fell to or below a level): notifications, a top-up.
      foreach v_level in array v_levels loop
        if balance - v_reserved <= v_level and balance - v_reserved + p_amount > v_level then
          perform billing.note_crossings(p_user_id, balance - v_reserved + p_amount, balance - v_reserved);
          exit;
        end if;
      end loop;
    end if;
    return next;
    return;
  end if;
  return query select * from billing.debit_overage(
    p_user_id, p_amount, p_idempotency_key, p_description, p_metadata, balance is not null);
end;
$$;

comment on function public.deduct_tokens(uuid, bigint, text, text, jsonb) is
'Charges usage: applied when available covers it; otherwise the plan''s overage strategy decides '
'(block and auto_top_up: insufficient_funds; throttle: applied below zero within the period''s '
'allowance, retry_after_ms set; postpaid: applied). duplicate for a replayed key, '
'unknown_account. Reports threshold crossings (notifications, auto top-ups).';

revoke all on function public.deduct_tokens(uuid, bigint, text, text, jsonb) from public, anon, authenticated;
grant execute on function public.deduct_tokens(uuid, bigint, text, text, jsonb) to service_role;

-- Auto top-up ---------------------------------------------------------------------------------

create function public.claim_auto_top_ups(
  p_limit integer default 10,
  p_lease interval default '2 minutes',
  p_as_of timestamptz default now()
)
returns table (
  id uuid,
  user_id uuid,
  product_code text,
  amount_cents bigint,
  currency text,
  stripe_customer_id text,
  idempotency_key text,
  attempts integer
)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
begin
  if p_limit is null or p_limit < 1 or p_limit > 1000 then
    raise exception using errcode = '22023',
      message = format('p_limit must be from 1 to 1000, got %s', coalesce(p_limit::text, 'null'));
  end if;
  if p_lease is null or p_lease <= interval '0' then
    raise exception using errcode = '22023', message = 'p_lease must be a positive interval';
  end if;
  return query
  with due as (
    select t.id
    from billing.auto_top_ups as t
    where t.status = 'pending' and (t.locked_until is null or t.locked_until <= coalesce(p_as_of, now()))
    order by t.created_at, t.id
    limit p_limit
    for update skip locked
  ),

  claimed as (
    update billing.auto_top_ups as t
    set attempts = t.attempts + 1, locked_until = coalesce(p_as_of, now()) + p_lease
    from due
    where t.id = due.id
    returning t.*
  )

  select
    c.id, c.user_id, c.product_code, c.amount_cents, c.currency,
    (
      select cu.stripe_customer_id from billing.customers as cu
      where cu.user_id = c.user_id
      order by cu.created_at, cu.stripe_customer_id
      limit 1
    ),
    'tb-auto-top-up-' || c.id::text, c.attempts
  from claimed as c
  order by c.created_at, c.id;
end;
$$;

comment on function public.claim_auto_top_ups(integer, interval, timestamptz) is
'Claims up to p_limit pending auto top-ups for p_lease (skipping those another worker holds): '
'what to charge, whose customer, and the Stripe idempotency key of the crossing (the same on '
'every attempt, so a crash and a retry charge once).';

revoke all on function public.claim_auto_top_ups(integer, interval, timestamptz) from public, anon, authenticated;
grant execute on function public.claim_auto_top_ups(integer, interval, timestamptz) to service_role;

create function public.finish_auto_top_up(
  p_id uuid,
  p_outcome text,
  p_payment_intent jsonb default null,
  p_detail text default null
) returns table (status text, detail text)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_top_up billing.auto_top_ups;
  v_pack billing.products;
  v_intent_id text := p_payment_intent ->> 'id';
begin
  if p_outcome is null or p_outcome not in ('succeeded', 'processing', 'failed', 'requires_action') then
    raise exception using errcode = '22023', message = format(
      'p_outcome must be succeeded, processing, failed or requires_action, got %s',
      coalesce(quote_literal(p_outcome), 'null'));
  end if;
  if p_outcome in ('succeeded', 'processing') and v_intent_id is null then
    raise exception using errcode = '22023',
      message = 'p_payment_intent must be the PaymentIntent Stripe returned when it was charged';
  end if;

  select t.* into v_top_up from billing.auto_top_ups as t where t.id = p_id for update;
  if not found then
    return query select 'unknown'::text, format('no auto top-up %s', p_id);
    return;
  end if;
  if v_top_up.status <> 'pending' then
    return query select 'duplicate'::text, format('auto top-up %s is %s already', p_id, v_top_up.status);
    return;
  end if;
  select p.* into v_pack from billing.products as p where p.code = v_top_up.product_code;

  if p_outcome in ('succeeded', 'processing') then
    -- What was sold, recorded as Stripe returned it; its payment_intent.succeeded credits it
    -- (and one that arrived before this record parked and is applied now).
    perform billing.record_stripe_sale(p_payment_intent, 'payment_intent', 'amount');
    update billing.auto_top_ups as t
    set status = 'charged', stripe_payment_intent_id = v_intent_id, detail = p_detail,
      decided_at = now(), locked_until = null
    where t.id = p_id;
    perform billing.notify(v_top_up.user_id, 'auto_top_up_charged',
      format('Auto top-up: %s bought for %s %s; the tokens land when the payment settles.',
        v_pack.name, round(v_top_up.amount_cents / 100.0, 2), upper(v_top_up.currency)),
      jsonb_build_object('auto_top_up', p_id, 'product', v_pack.code, 'tokens', v_pack.tokens,
        'amount_cents', v_top_up.amount_cents, 'currency', v_top_up.currency,
        'stripe_payment_intent', v_intent_id),
      'auto_top_up:' || p_id::text);
    perform billing.heal_parked_stripe_events(array[v_intent_id]);
    return query select 'applied'::text, format('auto top-up %s charged (%s)', p_id, v_intent_id);
    return;
  end if;

  update billing.auto_top_ups as t
  set status = p_outcome, stripe_payment_intent_id = v_intent_id, detail = p_detail,
    decided_at = now(), locked_until = null
  where t.id = p_id;
  insert into billing.auto_top_up_preferences as pr (user_id, enabled, reason)
  values (v_top_up.user_id, false, format('auto top-up %s %s: %s', p_id, p_outcome, coalesce(p_detail, '')))
  on conflict (user_id) do update
  set enabled = false, reason = excluded.reason, updated_at = now();
  perform billing.notify(v_top_up.user_id, 'auto_top_up_failed',
    case when p_outcome = 'requires_action'
      then format('Auto top-up of %s needs you to confirm the payment; auto top-up is off until you do.',
        v_pack.name)
      else format('Auto top-up of %s failed (%s); auto top-up is off. Update your card and top up.',
        v_pack.name, coalesce(p_detail, 'declined'))
    end,
    jsonb_build_object('auto_top_up', p_id, 'product', v_pack.code, 'outcome', p_outcome,
      'reason', p_detail, 'stripe_payment_intent', v_intent_id),
    'auto_top_up:' || p_id::text);
  return query select 'applied'::text, format('auto top-up %s %s; auto top-up turned off for user %s',
    p_id, p_outcome, v_top_up.user_id);
end;
$$;

comment on function public.finish_auto_top_up(uuid, text, jsonb, text) is
'Reports a claimed auto top-up: succeeded or processing records the PaymentIntent (its '
'payment_intent.succeeded credits the pack once) and notifies; failed or requires_action turns '
'auto top-up off for the user and notifies. Once per top-up: later reports answer duplicate.';

revoke all on function public.finish_auto_top_up(uuid, text, jsonb, text) from public, anon, authenticated;
grant execute on function public.finish_auto_top_up(uuid, text, jsonb, text) to service_role;

create function public.set_auto_top_up(p_user_id uuid, p_enabled boolean, p_reason text default null)
returns table (status text)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
begin
  if p_enabled is null then
    raise exception using errcode = '22023', message = 'p_enabled must not be null';
  end if;
  if not exists (select 1 from billing.accounts as a where a.user_id = p_user_id) then
    return query select 'unknown_account'::text;
    return;
  end if;
  insert into billing.auto_top_up_preferences as pr (user_id, enabled, reason)
  values (p_user_id, p_enabled, p_reason)
  on conflict (user_id) do update
  set enabled = excluded.enabled, reason = excluded.reason, updated_at = now()
  where pr.enabled is distinct from excluded.enabled;
  return query select case when found then 'applied' else 'duplicate' end;
end;
$$;

comment on function public.set_auto_top_up(uuid, boolean, text) is
'Turns auto top-up on or off for a user (e.g. on again once the card is fixed). Statuses: '
'applied, duplicate (already so), unknown_account.';

revoke all on function public.set_auto_top_up(uuid, boolean, text) from public, anon, authenticated;
grant execute on function public.set_auto_top_up(uuid, boolean, text) to service_role;

-- Postpaid ------------------------------------------------------------------------------------

create function public.postpaid_due(p_as_of timestamptz default now())
returns table (
  user_id uuid,
  period_start timestamptz,
  plan text,
  overage_tokens bigint,
  amount_cents bigint,
  currency text,
  stripe_customer_id text,
  idempotency_key text
)
language sql stable
security invoker
set search_path = ''
as $$
  select
    o.user_id, o.period_start, o.plan, o.overage_tokens,
    -- Rounded up to a whole minor unit.
    ceil(o.overage_tokens * coalesce(p.postpaid_unit_amount, 0) / 1000.0)::bigint,
    p.currency,
    (
      select cu.stripe_customer_id from billing.customers as cu
      where cu.user_id = o.user_id
      order by cu.created_at, cu.stripe_customer_id
      limit 1
    ),
    format('tb-postpaid-%s-%s', o.user_id, extract(epoch from o.period_start)::bigint)
  from billing.overage_periods as o
  inner join billing.products as p on p.code = o.plan
  where p.overage_strategy = 'postpaid' and o.overage_tokens > 0 and o.invoiced_at is null
    and o.period_start < billing.usage_period_start(o.user_id, coalesce(p_as_of, now()))
  order by o.period_start, o.user_id;
$$;

comment on function public.postpaid_due(timestamptz) is
'Postpaid periods that ended by p_as_of with overage not yet invoiced: tokens, the amount '
'(tokens x postpaid_unit_amount / 1000, rounded up), the customer and the Stripe idempotency key '
'of its invoice item. Security invoker: service_role reads the tables itself.';

revoke all on function public.postpaid_due(timestamptz) from public, anon, authenticated;
grant execute on function public.postpaid_due(timestamptz) to service_role;

create function public.mark_postpaid_invoiced(
  p_user_id uuid,
  p_period_start timestamptz,
  p_stripe_invoice_item_id text
) returns table (status text, balance bigint)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_period billing.overage_periods;
  v_credit record;
begin
  if p_stripe_invoice_item_id is null or p_stripe_invoice_item_id !~ '^ii_[A-Za-z0-9_]{1,250}$' then
    raise exception using errcode = '22023', message = format(
      'p_stripe_invoice_item_id must be a Stripe invoice item id (ii_...), got %s',
      coalesce(quote_literal(p_stripe_invoice_item_id), 'null'));
  end if;
  select o.* into v_period from billing.overage_periods as o
  where o.user_id = p_user_id and o.period_start = p_period_start
  for update;
  if not found then
    return query select 'unknown'::text, null::bigint;
    return;
  end if;
  if v_period.invoiced_at is not null then
    return query select 'duplicate'::text, null::bigint;
    return;
  end if;
  update billing.overage_periods as o
  set invoiced_at = now(), stripe_invoice_item_id = p_stripe_invoice_item_id
  where o.user_id = p_user_id and o.period_start = p_period_start;
  -- The invoiced tokens are paid for: they no longer count against the balance.
  select c.status, c.balance into v_credit
  from billing.credit(
    p_user_id, v_period.overage_tokens,
    format('postpaid:%s:%s', p_user_id, extract(epoch from p_period_start)::bigint), 'adjustment',
    format('Postpaid usage of the period from %s, invoiced as %s', p_period_start, p_stripe_invoice_item_id),
    null,
    jsonb_build_object('postpaid', true, 'period_start', p_period_start,
      'stripe_invoice_item', p_stripe_invoice_item_id)
  ) as c;
  return query select 'applied'::text, v_credit.balance;
end;
$$;

comment on function public.mark_postpaid_invoiced(uuid, timestamptz, text) is
'Records the Stripe invoice item that bills a postpaid period''s overage and credits those tokens '
'back (kind adjustment): what was invoiced no longer counts against the balance. Statuses: '
'applied, duplicate (already invoiced), unknown (no such period).';

revoke all on function public.mark_postpaid_invoiced(uuid, timestamptz, text) from public, anon, authenticated;
grant execute on function public.mark_postpaid_invoiced(uuid, timestamptz, text) to service_role;

-- Invariants and the payment intent event ----------------------------------------------------

create or replace function billing.check_invariants() returns table (
  user_id uuid, problem text, expected bigint, actual bigint
)
language sql stable
set search_path = ''
as $$
  with entry_totals as (
    select e.user_id, sum(e.amount)::bigint as total
    from billing.ledger_entries as e
    group by e.user_id
  ),

  pending_totals as (
    select r.user_id, sum(r.amount)::bigint as total
    from billing.reservations as r
    where r.status = 'pending'
    group by r.user_id
  ),

  bucket_totals as (
    select b.user_id, sum(b.remaining)::bigint as total
    from billing.credit_buckets as b
    group by b.user_id
  ),

  debt_users as (
    select distinct e.user_id
    from billing.ledger_entries as e
    where e.kind in ('clawback', 'dispute')
      -- An operator's adjustment allowed into debt (public.adjust_tokens, p_allow_debt).
      or (e.kind = 'adjustment' and e.amount < 0 and e.balance_after < 0)
      -- A throttle or postpaid plan's overage (billing.debit_overage).
      or (e.kind = 'usage' and e.metadata ? 'overage')
  ),

  chain as (
    select
      e.user_id,
      e.id,
      e.balance_after,
      sum(e.amount) over (partition by e.user_id order by e.id) as running
    from billing.ledger_entries as e
  )

  select a.user_id, 'balance = sum(ledger_entries.amount)', coalesce(t.total, 0), a.balance
  from billing.accounts as a
  left join entry_totals as t on a.user_id = t.user_id
  where a.balance <> coalesce(t.total, 0)
  union all
  select a.user_id, 'reserved = sum(pending reservations)', coalesce(p.total, 0), a.reserved
  from billing.accounts as a
  left join pending_totals as p on a.user_id = p.user_id
  where a.reserved <> coalesce(p.total, 0)
  union all
  select
    a.user_id,
    'greatest(sum(buckets.remaining) - undrawn + held_expired, 0) = greatest(balance, 0)',
    greatest(a.balance, 0), greatest(coalesce(b.total, 0) - a.undrawn + a.held_expired, 0)
  from billing.accounts as a
  left join bucket_totals as b on a.user_id = b.user_id
  where greatest(coalesce(b.total, 0) - a.undrawn + a.held_expired, 0) <> greatest(a.balance, 0)
  union all
  -- Holds keep their tokens: what is held never exceeds the tokens of unexpired buckets plus
  -- the held tokens whose bucket expired. Only debt (a clawback, a lost dispute) may break it.
  select
    a.user_id,
    'reserved <= sum(buckets.remaining) - undrawn + held_expired (holds keep their tokens)',
    coalesce(b.total, 0) - a.undrawn + a.held_expired, a.reserved
  from billing.accounts as a
  left join bucket_totals as b on a.user_id = b.user_id
  where a.reserved > coalesce(b.total, 0) - a.undrawn + a.held_expired
    and not exists (select 1 from debt_users as d where d.user_id = a.user_id)
  union all
  -- Also the accounts CHECK (accounts_row_valid); reported should it ever be dropped.
  select
    a.user_id, 'held_expired between 0 and reserved', a.reserved, a.held_expired
  from billing.accounts as a
  where a.held_expired < 0 or a.held_expired > a.reserved
  union all
  select
    e.user_id, format('entry %s (%s) left the balance below zero', e.id, e.kind), 0,
    e.balance_after
  from billing.ledger_entries as e
  where e.kind in ('usage', 'expiry') and e.balance_after < 0
    -- A throttle or postpaid plan's overage (billing.debit_overage) may end below zero.
    and not (e.kind = 'usage' and e.metadata ? 'overage')
  union all
  select e.user_id, format('entry %s without an account', e.id), null, null
  from billing.ledger_entries as e
  where not exists (select 1 from billing.accounts as a where a.user_id = e.user_id)
  union all
  select r.user_id, format('reservation %s without an account', r.id), null, null
  from billing.reservations as r
  where not exists (select 1 from billing.accounts as a where a.user_id = r.user_id)
  union all
  select c.user_id, format('entry %s: balance_after = running sum', c.id), c.running::bigint,
    c.balance_after
  from chain as c
  where c.balance_after <> c.running
  union all
  select
    e.user_id,
    format('entry %s: %s %s has the wrong sign, a key of %s characters or metadata of type %s',
      e.id, e.kind, e.amount, length(e.idempotency_key), jsonb_typeof(e.metadata)),
    null, null
  from billing.ledger_entries as e
  where (
    e.kind <> 'adjustment'
    and (e.amount < 0) <> (e.kind in ('usage', 'expiry', 'clawback', 'dispute'))
  )
    or length(e.idempotency_key) not between 1 and 255
    or jsonb_typeof(e.metadata) is distinct from 'object'
  union all
  -- The writers' rules (20261202400000_plain_checks.sql): the sign of each kind (adjustments
  -- either), a key of 1..255 characters, metadata an object, known kinds, and keys in
  -- token-billing's own namespaces only on the entries they describe.
  select e.user_id, format('entry %s: kind %s is not a known kind', e.id, e.kind), null, null
  from billing.ledger_entries as e
  where e.kind not in (
    'purchase', 'subscription', 'promotion', 'adjustment', 'refund', 'signup', 'dispute_won',
    'clawback_reversed', 'usage', 'expiry', 'clawback', 'dispute'
  )
  union all
  select
    e.user_id,
    format('entry %s: key %s is in token-billing''s namespace but not its entry', e.id,
      e.idempotency_key),
    null, null
  from billing.ledger_entries as e
  where (e.idempotency_key like 'signup:%' and e.kind <> 'signup')
    or (e.idempotency_key like 'expiry:%' and e.kind <> 'expiry')
    or (
      e.idempotency_key like 'reservation:%'
      and e.idempotency_key is distinct from 'reservation:' || e.reservation_id::text
    )
    or (
      e.idempotency_key like 'stripe:%'
      and not (
        e.kind in (
          'purchase', 'subscription', 'clawback', 'dispute', 'dispute_won', 'clawback_reversed'
        )
        and e.metadata ? 'stripe_event_id'
      )
    )
$$;

comment on function billing.check_invariants() is
'One row per broken invariant (none when the books are sound): balances equal entry sums, '
'reserved equals pending reservations, buckets plus held_expired hold the positive balance, '
'holds never exceed the tokens that back them (except in debt: a clawback, a lost dispute, an '
'adjustment allowed below zero or a plan''s overage), held_expired is within 0..reserved, '
'usage (but a throttle or postpaid plan''s overage) and expiry never leave a balance below '
'zero, balance_after chains, entries have the sign of their kind (adjustments either), a key '
'of 1..255 characters, object metadata, known kinds and keys of token-billing''s namespaces '
'only on their own entries.';

revoke all on function billing.check_invariants() from public;

create or replace function billing.apply_payment_intent_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_intent jsonb := billing.require_stripe_object(p_event, 'payment_intent');
  v_intent_id text := v_intent ->> 'id';
  v_amount bigint := coalesce(
    billing.stripe_bigint(v_intent -> 'amount_received', 'amount_received'),
    billing.stripe_bigint(v_intent -> 'amount', 'amount'));
  v_currency text := lower(v_intent ->> 'currency');
  v_sale billing.stripe_sales;
  v_product billing.products;
begin
  if coalesce(v_intent ->> 'status', 'succeeded') <> 'succeeded' then
    return query select 'ignored'::text, format('payment intent %s is %s: nothing to credit',
      v_intent_id, v_intent ->> 'status');
    return;
  end if;
  select s.* into v_sale from billing.stripe_sales as s
  where s.id = v_intent_id and s.kind = 'payment_intent';
  if not found and v_intent #>> '{metadata,token_billing_auto_top_up}' is not null then
    -- An auto top-up charged off-session: its webhook may overtake the service's record
    -- (public.finish_auto_top_up), which heals this event.
    return query select 'parked'::text, format(
      'payment intent %s of auto top-up %s is not recorded yet: applied when the service records it',
      v_intent_id, v_intent #>> '{metadata,token_billing_auto_top_up}');
    return;
  end if;
  if not found then
    return query select 'ignored'::text, format(
      'payment intent %s was not recorded by the service (record_payment_intent): a Checkout '
      'Session''s payment is credited by its checkout.session event', v_intent_id);
    return;
  end if;
  if (v_amount, v_currency) is distinct from (v_sale.amount_cents, v_sale.currency) then
    return query select 'parked'::text, format(
      'payment intent %s received %s %s, but it was sold for %s %s: not credited', v_intent_id,
      coalesce(v_amount::text, 'null'), coalesce(v_currency, 'null'), v_sale.amount_cents,
      v_sale.currency);
    return;
  end if;
  select p.* into v_product from billing.products as p where p.code = v_sale.product_code;
  return query select * from billing.credit_stripe_sale(
    p_event, v_intent_id, 'payment_intent', v_sale.user_id, v_product, v_sale.quantity, v_amount,
    v_currency, v_intent_id, billing.stripe_ref(v_intent -> 'customer'));
end;
$$;

comment on function billing.apply_payment_intent_event(jsonb) is
'payment_intent.succeeded: credits a PaymentIntent the service recorded (Stripe''s Payment '
'Element, an auto top-up) once, key stripe:payment_intent:<intent>, the amount and currency '
'checked; parks an auto top-up''s that is not recorded yet (finish_auto_top_up heals it); ignores '
'any other it did not record (a Checkout Session''s payment intent credits through the session).';

insert into billing.schema_migrations (version, name) values ('20261202700300', 'overage');
