-- Migration: several Stripe prices per plan (monthly, annual, other currencies), and annual plans'
-- grant schedules.
--
-- Purpose: a plan sells at its products row's price (stripe_price_id: monthly, in its currency)
-- and at any number of further prices in billing.product_prices (an annual price, a price in
-- euros), each mapped back to the plan: invoices and subscriptions find their plan through
-- billing.plan_of_price(), whichever price they name. A paid invoice of an annual price grants a
-- year of the plan's tokens: all at once, expiring at the year's end (annual_grants = yearly), or
-- the first month's now and one grant at the start of each further month (monthly, the default:
-- 12 grants, each expiring at its month's end unless the plan rolls over), made by
-- public.grant_scheduled_tokens() from billing.scheduled_grants. A payment refunded in full stops
-- the grants still to come.
-- Objects: billing.product_prices, billing.scheduled_grants, column billing.products.annual_grants,
--   billing.plan_of_price(), billing.price_interval(), public.list_product_prices(),
--   public.set_product_price(), public.grant_scheduled_tokens(); redefines
--   billing.apply_invoice_paid_event() (20261202200120) and billing.apply_subscription_event()
--   (20261202200130) to map prices through billing.plan_of_price().

alter table billing.products
add column annual_grants text not null default 'monthly',
add constraint products_annual_grants_known check (annual_grants in ('monthly', 'yearly'));

comment on column billing.products.annual_grants is
'Plans: how an annual price grants its year of tokens (12 x tokens): monthly (12 grants, one at '
'the start of each month) or yearly (one grant for the year).';

create table billing.product_prices (
  stripe_price_id text,
  product_code text not null references billing.products (code) on update cascade,
  billing_interval text not null,
  currency text not null default 'usd',
  unit_amount bigint not null,
  active boolean not null default true,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint product_prices_pkey primary key (product_code, billing_interval, currency),
  constraint product_prices_stripe_price_id_key unique (stripe_price_id),
  constraint product_prices_interval_known check (billing_interval in ('month', 'year')),
  constraint product_prices_currency_format check (currency ~ '^[a-z]{3}$'),
  constraint product_prices_amount_valid check (unit_amount >= 0),
  constraint product_prices_price_format check (stripe_price_id ~ '^price_[A-Za-z0-9_]{1,250}$')
);

comment on table billing.product_prices is
'Further prices of a plan besides its products row''s (monthly, in products.currency): one per '
'interval and currency, each mapped back to the plan by its Stripe price id.';
comment on column billing.product_prices.stripe_price_id is
'The Stripe price (set by token-billing stripe sync-products, or adopted); null until synced.';
comment on column billing.product_prices.product_code is 'The plan it sells.';
comment on column billing.product_prices.billing_interval is 'month or year.';
comment on column billing.product_prices.currency is 'ISO currency code, lowercase.';
comment on column billing.product_prices.unit_amount is
'The price per interval in the currency''s minor unit (e.g. 95000 = $950.00 a year).';
comment on column billing.product_prices.active is 'Inactive prices are not offered at checkout.';
comment on column billing.product_prices.created_at is 'When the price was added.';
comment on column billing.product_prices.updated_at is 'When the price was last changed.';

alter table billing.product_prices enable row level security;

-- The pricing cards read the active prices, as they read the active catalog.
create policy product_prices_select_active on billing.product_prices
for select to authenticated
using (active);

revoke all on billing.product_prices from public, anon, authenticated, service_role;
grant select on billing.product_prices to authenticated, service_role;

create table billing.scheduled_grants (
  stripe_invoice_id text not null,
  installment integer not null,
  user_id uuid not null references billing.accounts (user_id),
  product_code text not null references billing.products (code) on update cascade,
  tokens bigint not null,
  grant_at timestamptz not null,
  expires_at timestamptz,
  stripe_event_id text not null,
  status text not null default 'pending',
  entry_id bigint,
  decided_at timestamptz,
  constraint scheduled_grants_pkey primary key (stripe_invoice_id, installment),
  constraint scheduled_grants_installment_valid check (installment between 2 and 12),
  constraint scheduled_grants_tokens_positive check (tokens > 0),
  constraint scheduled_grants_status_known check (status in ('pending', 'granted', 'canceled')),
  constraint scheduled_grants_decided check ((status = 'pending') = (decided_at is null))
);

create index scheduled_grants_due_idx on billing.scheduled_grants (grant_at)
where status = 'pending';

comment on table billing.scheduled_grants is
'Months 2 to 12 of an annual price paid with annual_grants = monthly: each is granted once, when '
'grant_at has come (public.grant_scheduled_tokens), or canceled when the payment is refunded in '
'full.';
comment on column billing.scheduled_grants.stripe_invoice_id is 'The paid annual invoice.';
comment on column billing.scheduled_grants.installment is 'Which month of the year (2..12).';
comment on column billing.scheduled_grants.user_id is 'Who is granted.';
comment on column billing.scheduled_grants.product_code is 'The plan paid for.';
comment on column billing.scheduled_grants.tokens is 'The month''s tokens (plan tokens x quantity).';
comment on column billing.scheduled_grants.grant_at is 'The start of that month.';
comment on column billing.scheduled_grants.expires_at is
'The end of that month (null when the plan rolls over).';
comment on column billing.scheduled_grants.stripe_event_id is 'The event that paid the invoice.';
comment on column billing.scheduled_grants.status is 'pending, granted or canceled.';
comment on column billing.scheduled_grants.entry_id is 'The ledger entry of the grant.';
comment on column billing.scheduled_grants.decided_at is 'When it was granted or canceled.';

alter table billing.scheduled_grants enable row level security;
-- No policy: service role only.
revoke all on billing.scheduled_grants from public, anon, authenticated, service_role;
grant select on billing.scheduled_grants to service_role;

create function billing.plan_of_price(p_stripe_price_id text) returns text
language sql stable
set search_path = ''
as $$
  select coalesce(
    (select p.code from billing.products as p
      where p.stripe_price_id = p_stripe_price_id and p.kind = 'plan'),
    (select pp.product_code from billing.product_prices as pp
      inner join billing.products as p on p.code = pp.product_code and p.kind = 'plan'
      where pp.stripe_price_id = p_stripe_price_id)
  )
$$;

comment on function billing.plan_of_price(text) is
'The plan a Stripe price sells: the plan whose stripe_price_id it is, or whose product_prices '
'lists it; null for any other price (a pack''s, an unknown one).';

revoke all on function billing.plan_of_price(text) from public;

create function billing.price_interval(p_stripe_price_id text) returns text
language sql stable
set search_path = ''
as $$
  select coalesce(
    (select pp.billing_interval from billing.product_prices as pp
      where pp.stripe_price_id = p_stripe_price_id),
    'month')
$$;

comment on function billing.price_interval(text) is
'The billing interval of a plan''s price: product_prices says; a products row''s price is monthly.';

revoke all on function billing.price_interval(text) from public;

create function public.list_product_prices(p_include_inactive boolean default false)
returns table (
  product_code text,
  billing_interval text,
  currency text,
  unit_amount bigint,
  stripe_price_id text,
  active boolean
)
language sql stable
security invoker
set search_path = ''
as $$
  select pp.product_code, pp.billing_interval, pp.currency, pp.unit_amount, pp.stripe_price_id, pp.active
  from billing.product_prices as pp
  inner join billing.products as p on p.code = pp.product_code
  where (pp.active and p.active) or coalesce(p_include_inactive, false)
  order by p.sort_order, pp.product_code, pp.billing_interval, pp.currency;
$$;

comment on function public.list_product_prices(boolean) is
'The further prices of the plans (annual, other currencies), active ones or all. Security '
'invoker: service_role reads billing.product_prices itself.';

revoke all on function public.list_product_prices(boolean) from public, anon, authenticated;
grant execute on function public.list_product_prices(boolean) to service_role;

create function public.set_product_price(
  p_code text,
  p_interval text,
  p_currency text,
  p_unit_amount bigint,
  p_stripe_price_id text
) returns table (status text)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
begin
  if p_interval is null or p_interval not in ('month', 'year') then
    raise exception using errcode = '22023',
      message = format('p_interval must be month or year, got %s', coalesce(quote_literal(p_interval), 'null'));
  end if;
  if p_currency is null or p_currency !~ '^[a-z]{3}$' then
    raise exception using errcode = '22023',
      message = format('p_currency must be a lowercase ISO code, got %s',
        coalesce(quote_literal(p_currency), 'null'));
  end if;
  if p_unit_amount is null or p_unit_amount < 0 then
    raise exception using errcode = '22023',
      message = format('p_unit_amount must be 0 or more, got %s', coalesce(p_unit_amount::text, 'null'));
  end if;
  if p_stripe_price_id is not null and p_stripe_price_id !~ '^price_[A-Za-z0-9_]{1,250}$' then
    raise exception using errcode = '22023',
      message = format('p_stripe_price_id must be a Stripe price id (price_...), got %L', p_stripe_price_id);
  end if;
  if not exists (select 1 from billing.products as p where p.code = p_code and p.kind = 'plan') then
    return query select 'unknown_product'::text;
    return;
  end if;

  insert into billing.product_prices as pp (
    product_code, billing_interval, currency, unit_amount, stripe_price_id
  )
  values (p_code, p_interval, p_currency, p_unit_amount, p_stripe_price_id)
  on conflict (product_code, billing_interval, currency) do update
  set unit_amount = excluded.unit_amount,
    stripe_price_id = coalesce(excluded.stripe_price_id, pp.stripe_price_id),
    active = true, updated_at = now()
  where (pp.unit_amount, pp.stripe_price_id, pp.active)
    is distinct from (excluded.unit_amount, coalesce(excluded.stripe_price_id, pp.stripe_price_id), true);
  if found then
    return query select 'applied'::text;
  else
    return query select 'duplicate'::text;
  end if;
end;
$$;

comment on function public.set_product_price(text, text, text, bigint, text) is
'Adds or updates a plan''s price for an interval and currency, and maps its Stripe price to the '
'plan (sync-products, --adopt). Statuses: applied, duplicate (unchanged), unknown_product (no '
'such plan). 22023 on invalid arguments; 23505 if another product has that price.';

revoke all on function public.set_product_price(text, text, text, bigint, text) from public, anon, authenticated;
grant execute on function public.set_product_price(text, text, text, bigint, text) to service_role;

create function public.grant_scheduled_tokens(p_as_of timestamptz default now())
returns table (granted bigint, canceled bigint)
language plpgsql
-- Definer: the caller (service_role, pg_cron) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_grant record;
  v_credit record;
  v_as_of timestamptz := coalesce(p_as_of, now());
begin
  granted := 0;
  canceled := 0;
  for v_grant in
    select g.*
    from billing.scheduled_grants as g
    where g.status = 'pending' and g.grant_at <= v_as_of
    order by g.user_id, g.grant_at, g.stripe_invoice_id, g.installment
    for update skip locked
  loop
    if exists (
      select 1 from billing.stripe_payments as sp
      where sp.id = v_grant.stripe_invoice_id
        and sp.refunded_cents >= sp.amount_paid_cents and sp.amount_paid_cents > 0
    ) then
      update billing.scheduled_grants as g
      set status = 'canceled', decided_at = now()
      where g.stripe_invoice_id = v_grant.stripe_invoice_id and g.installment = v_grant.installment;
      canceled := canceled + 1;
      continue;
    end if;
    select c.status, c.entry_id into v_credit
    from billing.credit(
      v_grant.user_id, v_grant.tokens,
      format('stripe:invoice:%s:m%s', v_grant.stripe_invoice_id, v_grant.installment), 'subscription',
      format('Plan %s tokens, month %s of 12 of invoice %s', v_grant.product_code, v_grant.installment,
        v_grant.stripe_invoice_id),
      case when v_grant.expires_at > v_as_of then v_grant.expires_at end,
      jsonb_build_object(
        'stripe_event_id', v_grant.stripe_event_id, 'stripe_invoice', v_grant.stripe_invoice_id,
        'product', v_grant.product_code, 'installment', v_grant.installment,
        'period_end', v_grant.expires_at)
    ) as c;
    update billing.scheduled_grants as g
    set status = 'granted', entry_id = v_credit.entry_id, decided_at = now()
    where g.stripe_invoice_id = v_grant.stripe_invoice_id and g.installment = v_grant.installment;
    granted := granted + 1;
  end loop;
  return next;
end;
$$;

comment on function public.grant_scheduled_tokens(timestamptz) is
'Grants every scheduled month of an annual plan whose grant_at has come by p_as_of (key '
'stripe:invoice:<invoice>:m<n>, kind subscription, once each; a month already over grants '
'nothing that expires) and cancels those of a payment refunded in full. Run it with '
'expire_tokens (pg_cron). Returns how many were granted and canceled.';

revoke all on function public.grant_scheduled_tokens(timestamptz) from public, anon, authenticated;
grant execute on function public.grant_scheduled_tokens(timestamptz) to service_role;

create or replace function billing.apply_invoice_paid_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_invoice jsonb := billing.require_stripe_object(p_event, 'invoice');
  v_invoice_id text := v_invoice ->> 'id';
  v_reason text := v_invoice ->> 'billing_reason';
  v_customer text := billing.stripe_ref(v_invoice -> 'customer');
  v_amount_paid bigint := coalesce(billing.stripe_bigint(v_invoice -> 'amount_paid', 'amount_paid'), 0);
  v_lines jsonb := case
    when jsonb_typeof(v_invoice #> '{lines,data}') = 'array' then v_invoice #> '{lines,data}'
    else '[]'
  end;
  v_line jsonb;
  v_old_line jsonb;
  v_code text;
  v_old_code text;
  v_product billing.products;
  v_old billing.products;
  v_subscription_id text;
  v_subscription billing.subscriptions;
  v_user_id uuid;
  v_problem text;
  v_quantity bigint;
  v_tokens bigint;
  v_fraction numeric;
  v_unit numeric;
  v_what text;
  v_period_end timestamptz;
  v_payment_intent text;
  v_charge text;
  v_credit record;
  v_period_start timestamptz;
  v_grant_end timestamptz;
  v_installments integer := 0;
begin
  if v_reason is null
    or v_reason not in ('subscription_create', 'subscription_cycle', 'subscription_update') then
    return query select 'ignored'::text, format(
      'invoice %s (billing_reason %s): only subscription_create and subscription_cycle invoices '
      'grant plan tokens (and subscription_update ones, for plan changes)', v_invoice_id, coalesce(v_reason, 'null'));
    return;
  end if;

  -- The plan paid for: the first non-proration line with a plan's price.
  select l.line, p.code into v_line, v_code
  from jsonb_array_elements(v_lines) with ordinality as l (line, n)
  inner join billing.products as p
    on p.code = billing.plan_of_price(billing.invoice_line_price(l.line))
  where not billing.invoice_line_proration(l.line)
  order by l.n
  limit 1;

  if v_code is null and v_reason = 'subscription_update' then
    -- A change invoiced at once: the new plan's remaining time (positive) against the old
    -- plan's unused time (negative).
    select l.line, p.code into v_line, v_code
    from jsonb_array_elements(v_lines) as l (line)
    inner join billing.products as p
      on p.code = billing.plan_of_price(billing.invoice_line_price(l.line))
    where billing.invoice_line_proration(l.line)
      and coalesce(billing.stripe_bigint(l.line -> 'amount', 'line amount'), 0) > 0
    order by (l.line ->> 'amount')::numeric desc
    limit 1;
    select l.line, p.code into v_old_line, v_old_code
    from jsonb_array_elements(v_lines) as l (line)
    inner join billing.products as p
      on p.code = billing.plan_of_price(billing.invoice_line_price(l.line))
    where billing.invoice_line_proration(l.line)
      and coalesce(billing.stripe_bigint(l.line -> 'amount', 'line amount'), 0) < 0
    order by (l.line ->> 'amount')::numeric
    limit 1;
    if v_code is null then
      return query select 'ignored'::text, format(
        'invoice %s (subscription_update): no proration line charges a plan: nothing to grant '
        '(a downgrade takes effect at the next period)', v_invoice_id);
      return;
    end if;
  end if;

  if v_code is null then
    return query select 'parked'::text, format(
      'invoice %s: no line''s price is a plan''s stripe_price_id (prices: %s)',
      v_invoice_id,
      coalesce((
        select string_agg(distinct billing.invoice_line_price(l.line), ', ')
        from jsonb_array_elements(v_lines) as l (line)
      ), 'none'));
    return;
  end if;
  select p.* into v_product from billing.products as p where p.code = v_code;

  v_subscription_id := coalesce(
    billing.stripe_ref(v_invoice -> 'subscription'),
    v_invoice #>> '{parent,subscription_details,subscription}',
    billing.stripe_ref(v_line -> 'subscription'),
    v_line #>> '{parent,subscription_item_details,subscription}'
  );
  select s.* into v_subscription from billing.subscriptions as s where s.id = v_subscription_id;

  select r.user_id, r.problem into v_user_id, v_problem
  from billing.resolve_stripe_user(
    array['subscription metadata.user_id'],
    array[coalesce(
      v_invoice #>> '{parent,subscription_details,metadata,user_id}',
      v_invoice #>> '{subscription_details,metadata,user_id}',
      v_line #>> '{metadata,user_id}'
    )],
    v_customer, v_subscription_id, true
  ) as r;
  if v_user_id is null then
    return query select 'parked'::text, format('invoice %s: %s', v_invoice_id, v_problem);
    return;
  end if;

  v_quantity := coalesce(billing.stripe_bigint(v_line -> 'quantity', 'line quantity'), 1);
  v_period_end := coalesce(
    to_timestamp(billing.stripe_bigint(v_line #> '{period,end}', 'line period.end')),
    v_subscription.current_period_end
  );

  if billing.invoice_line_proration(v_line) then
    -- Upgrade policy: (new tokens - old tokens) x the unused part of the period, rounded down.
    -- The unused part is the new plan's proration amount over its full price for the quantity:
    -- the line's price.unit_amount (before API 2025-03-31), else the catalog's price_cents.
    select p.* into v_old from billing.products as p where p.code = v_old_code;
    v_unit := coalesce(
      (v_line #>> '{price,unit_amount}')::numeric, v_product.price_cents::numeric,
      (v_line #>> '{pricing,unit_amount_decimal}')::numeric);
    v_fraction := case
      when coalesce(v_unit, 0) > 0
        then least(greatest((v_line ->> 'amount')::numeric / (v_unit * v_quantity), 0), 1)
      else 0
    end;
    v_tokens := floor(
      (v_product.tokens * v_quantity
        - coalesce(v_old.tokens * coalesce(billing.stripe_bigint(v_old_line -> 'quantity',
          'line quantity'), 1), 0))
      * v_fraction)::bigint;
    v_what := format('plan %s (upgrade from %s for %s of the period)', v_product.code,
      coalesce(v_old.code, 'none'), round(v_fraction, 4));
    if v_tokens <= 0 then
      return query select 'ignored'::text, format(
        'invoice %s: %s grants no tokens (a downgrade takes effect at the next period)',
        v_invoice_id, v_what);
      return;
    end if;
  elsif v_reason = 'subscription_create' and v_amount_paid = 0
    and coalesce(billing.stripe_bigint(v_line -> 'amount', 'line amount'), 0) = 0 then
    v_tokens := coalesce(v_product.trial_tokens, v_product.tokens) * v_quantity;
    v_what := format('plan %s (trial)', v_product.code);
  else
    v_tokens := v_product.tokens * v_quantity;
    v_what := format('plan %s', v_product.code);
    if billing.price_interval(billing.invoice_line_price(v_line)) = 'year' then
      -- An annual price: a year of the plan's monthly tokens, at once or in 12 monthly grants.
      v_period_start := coalesce(
        to_timestamp(billing.stripe_bigint(v_line #> '{period,start}', 'line period.start')),
        v_period_end - interval '1 year');
      if v_product.annual_grants = 'yearly' then
        v_tokens := v_tokens * 12;
        v_what := format('plan %s (a year)', v_product.code);
      else
        v_installments := 12;
        v_grant_end := least(v_period_start + interval '1 month', v_period_end);
        v_what := format('plan %s (month 1 of 12)', v_product.code);
      end if;
    end if;
  end if;
  if v_tokens <= 0 then
    return query select 'ignored'::text, format('invoice %s: %s x %s grants no tokens',
      v_invoice_id, v_what, v_quantity);
    return;
  end if;

  perform billing.ensure_account(v_user_id);
  if v_customer is not null then
    perform billing.link_customer(v_customer, v_user_id);
  end if;

  -- The payment refunds and disputes name: the older fields, the invoice's payments list, or an
  -- invoice_payment.paid that arrived first.
  select coalesce(billing.stripe_ref(v_invoice -> 'payment_intent'), x.pi),
    coalesce(billing.stripe_ref(v_invoice -> 'charge'), x.ch)
  into v_payment_intent, v_charge
  from (
    select
      coalesce(
        (select billing.stripe_ref(pay.value #> '{payment,payment_intent}')
          from jsonb_array_elements(case when jsonb_typeof(v_invoice #> '{payments,data}') = 'array'
            then v_invoice #> '{payments,data}' else '[]' end) as pay
          where pay.value #> '{payment,payment_intent}' is not null
          limit 1),
        (select ip.stripe_payment_intent_id from billing.stripe_invoice_payments as ip
          where ip.invoice_id = v_invoice_id and ip.stripe_payment_intent_id is not null
          order by ip.created_at limit 1)) as pi,
      coalesce(
        (select billing.stripe_ref(pay.value #> '{payment,charge}')
          from jsonb_array_elements(case when jsonb_typeof(v_invoice #> '{payments,data}') = 'array'
            then v_invoice #> '{payments,data}' else '[]' end) as pay
          where pay.value #> '{payment,charge}' is not null
          limit 1),
        (select ip.stripe_charge_id from billing.stripe_invoice_payments as ip
          where ip.invoice_id = v_invoice_id and ip.stripe_charge_id is not null
          order by ip.created_at limit 1)) as ch
  ) as x;

  -- A refund or dispute of this payment that is parking holds these (billing.lock_stripe_refs).
  perform billing.lock_stripe_refs(array[v_payment_intent, v_charge]);
  insert into billing.stripe_payments (
    id, source, user_id, product_code, quantity, tokens, amount_paid_cents, currency,
    stripe_payment_intent_id, stripe_charge_id, paid_at
  )
  values (
    v_invoice_id, 'invoice', v_user_id, v_product.code, v_quantity,
    v_tokens * greatest(v_installments, 1), v_amount_paid,
    v_invoice ->> 'currency', v_payment_intent, v_charge,
    to_timestamp(billing.stripe_bigint(p_event -> 'created', 'created'))
  )
  on conflict do nothing;

  select c.status, c.balance, c.entry_id into v_credit
  from billing.credit(
    v_user_id, v_tokens, 'stripe:invoice:' || v_invoice_id, 'subscription',
    format('Plan %s tokens for the period ending %s', v_product.code,
      coalesce(v_grant_end, v_period_end)),
    case when v_product.rollover then null else coalesce(v_grant_end, v_period_end) end,
    jsonb_build_object(
      'stripe_event_id', p_event ->> 'id', 'stripe_invoice', v_invoice_id,
      'stripe_subscription', v_subscription_id, 'product', v_product.code,
      'period_end', v_period_end)
  ) as c;

  if v_credit.status = 'applied' and v_installments > 0 then
    -- Months 2 to 12, granted by public.grant_scheduled_tokens when each month begins.
    insert into billing.scheduled_grants (
      user_id, stripe_invoice_id, installment, tokens, grant_at, expires_at, product_code,
      stripe_event_id
    )
    select
      v_user_id, v_invoice_id, m.n, v_tokens, v_period_start + make_interval(months => m.n - 1),
      case when not v_product.rollover
          then least(v_period_start + make_interval(months => m.n), v_period_end) end,
      v_product.code, p_event ->> 'id'
    from generate_series(2, v_installments) as m (n)
    on conflict do nothing;
  end if;

  if v_credit.status = 'applied' then
    return query select 'applied'::text, format(
      'granted %s tokens of %s to user %s%s (balance %s)', v_tokens, v_what, v_user_id,
      case when v_product.rollover then '' else format(', expiring %s', coalesce(v_grant_end, v_period_end)) end,
      v_credit.balance);
  else
    return query select 'duplicate'::text, format(
      'invoice %s was already granted (ledger entry %s)', v_invoice_id, v_credit.entry_id);
  end if;
end;
$$;

create or replace function billing.apply_subscription_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_sub jsonb := billing.require_stripe_object(p_event, 'subscription');
  v_subscription_id text := v_sub ->> 'id';
  v_created timestamptz := to_timestamp(billing.stripe_bigint(p_event -> 'created', 'created'));
  v_customer text := billing.stripe_ref(v_sub -> 'customer');
  v_items jsonb := case
    when jsonb_typeof(v_sub #> '{items,data}') = 'array' then v_sub #> '{items,data}'
    else '[]'
  end;
  v_status text := case
    when p_event ->> 'type' = 'customer.subscription.deleted' then 'canceled'
    when v_sub ->> 'status' in ('active', 'trialing', 'past_due')
      and jsonb_typeof(v_sub -> 'pause_collection') = 'object' then 'paused'
    else v_sub ->> 'status'
  end;
  v_item jsonb;
  v_code text;
  v_existing billing.subscriptions;
  v_user_id uuid;
  v_problem text;
  v_period_start timestamptz;
  v_period_end timestamptz;
begin
  if v_status is null or v_status not in (
    'incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due', 'canceled', 'unpaid',
    'paused'
  ) then
    return query select 'parked'::text, format('subscription %s: unknown status %s',
      v_subscription_id, coalesce(quote_literal(v_status), 'null'));
    return;
  end if;

  select l.item, p.code into v_item, v_code
  from jsonb_array_elements(v_items) with ordinality as l (item, n)
  inner join billing.products as p
    on p.code = billing.plan_of_price(coalesce(
      billing.stripe_ref(l.item -> 'price'), billing.stripe_ref(l.item -> 'plan')
    ))
  order by l.n
  limit 1;

  -- The period is on the item from API 2025-03-31 (basil), on the subscription before.
  v_period_start := to_timestamp(coalesce(
    billing.stripe_bigint(v_item -> 'current_period_start', 'current_period_start'),
    billing.stripe_bigint(v_sub -> 'current_period_start', 'current_period_start')));
  v_period_end := to_timestamp(coalesce(
    billing.stripe_bigint(v_item -> 'current_period_end', 'current_period_end'),
    billing.stripe_bigint(v_sub -> 'current_period_end', 'current_period_end')));

  select s.* into v_existing
  from billing.subscriptions as s
  where s.id = v_subscription_id
  for update;
  if found and (
    v_created < v_existing.last_event_created
    or (v_created = v_existing.last_event_created
      and (billing.subscription_status_rank(v_status), coalesce(v_period_end, '-infinity'))
        < (billing.subscription_status_rank(v_existing.status),
          coalesce(v_existing.current_period_end, '-infinity')))
  ) then
    return query select 'stale'::text, format(
      'subscription %s: event of %s is older than the last applied (%s)%s', v_subscription_id,
      v_created, v_existing.last_event_created,
      case when v_created = v_existing.last_event_created then format(
        ': same second, and %s is not further along than %s', v_status, v_existing.status)
        else '' end);
    return;
  end if;

  if v_code is null and v_status in ('canceled', 'incomplete_expired') then
    -- An ended subscription keeps its recorded plan: its price may have left the catalog.
    v_code := v_existing.product_code;
  end if;
  if v_code is null then
    return query select 'parked'::text, format(
      'subscription %s: no item''s price is a plan''s stripe_price_id (prices: %s)',
      v_subscription_id,
      coalesce((
        select string_agg(distinct coalesce(
          billing.stripe_ref(l.item -> 'price'), billing.stripe_ref(l.item -> 'plan')), ', ')
        from jsonb_array_elements(v_items) as l (item)
      ), 'none'));
    return;
  end if;

  if v_existing.id is not null then
    v_user_id := v_existing.user_id;
  else
    select r.user_id, r.problem into v_user_id, v_problem
    from billing.resolve_stripe_user(
      array['metadata.user_id'], array[v_sub #>> '{metadata,user_id}'], v_customer,
      v_subscription_id, true
    ) as r;
  end if;
  if v_user_id is null then
    return query select 'parked'::text,
      format('subscription %s: %s', v_subscription_id, v_problem);
    return;
  end if;

  perform billing.ensure_account(v_user_id);
  if v_customer is not null and billing.link_customer(v_customer, v_user_id) <> v_user_id then
    return query select 'ignored'::text, format(
      'subscription %s: customer %s belongs to another user than %s; not recorded',
      v_subscription_id, v_customer, v_user_id);
    return;
  end if;

  insert into billing.subscriptions as s (
    id, user_id, stripe_customer_id, product_code, stripe_price_id, status,
    current_period_start, current_period_end, cancel_at_period_end, last_event_id,
    last_event_created
  )
  values (
    v_subscription_id, v_user_id, v_customer, v_code,
    coalesce(billing.stripe_ref(v_item -> 'price'), billing.stripe_ref(v_item -> 'plan')),
    v_status, v_period_start, v_period_end,
    coalesce(v_sub -> 'cancel_at_period_end' = 'true'::jsonb, false),
    p_event ->> 'id', v_created
  )
  on conflict (id) do update
  set
    stripe_customer_id = coalesce(excluded.stripe_customer_id, s.stripe_customer_id),
    product_code = excluded.product_code,
    stripe_price_id = coalesce(excluded.stripe_price_id, s.stripe_price_id),
    status = excluded.status,
    current_period_start = coalesce(excluded.current_period_start, s.current_period_start),
    current_period_end = coalesce(excluded.current_period_end, s.current_period_end),
    cancel_at_period_end = excluded.cancel_at_period_end,
    last_event_id = excluded.last_event_id,
    last_event_created = excluded.last_event_created,
    updated_at = now()
  where s.last_event_created < excluded.last_event_created
    or (s.last_event_created = excluded.last_event_created
      and (billing.subscription_status_rank(excluded.status),
        coalesce(excluded.current_period_end, '-infinity'))
        >= (billing.subscription_status_rank(s.status),
          coalesce(s.current_period_end, '-infinity')))
  returning s.user_id into v_user_id;

  if not found then
    -- A newer event for this subscription committed while this one waited.
    return query select 'stale'::text, format(
      'subscription %s: a newer event was applied concurrently', v_subscription_id);
    return;
  end if;

  perform billing.sync_account_plan(v_user_id);

  return query select 'applied'::text, format('subscription %s of user %s: %s on plan %s',
    v_subscription_id, v_user_id, v_status, v_code);
end;
$$;

insert into billing.schema_migrations (version, name) values ('20261202700100', 'plan_prices');
