-- Stripe history for the report rows of the scaling measurement, beside history.sql's ledger:
-- for each of its :users history users, two pack payments (a tenth refunded in part, a fiftieth
-- lost in a dispute) and one monthly subscription with six states 4 months apart; a fifth of
-- the users pay in euros. The first 1,000 users are today's customers (their history spans the
-- last 24 months, the month measured among them); the others are the older history a larger
-- database has (2 to 10 years ago, their subscriptions canceled by then), so one month's
-- business is the same in both databases and only the history grows. The subscription events
-- go through the real trigger (billing.subscription_states); payments, refunds and disputes are
-- written directly, consistent by construction. Run as superuser after history.sql.

insert into billing.customers (stripe_customer_id, user_id)
select 'cus_bench' || h, lpad(to_hex(100000000 + h), 32, '0')::uuid
from generate_series(1, :users) as h;

insert into billing.stripe_payments (
  id, source, user_id, product_code, quantity, tokens, amount_paid_cents, currency, paid_at
)
select
  'cs_bench_' || h || '_' || k, 'checkout_session', lpad(to_hex(100000000 + h), 32, '0')::uuid,
  'pack_250', 1, 250, 1000, case when h % 5 = 0 then 'eur' else 'usd' end,
  case when h <= 1000
    then now() - interval '730 days' * ((h * 7919 + k * 104729) % 100000) / 100000.0
    else now() - interval '730 days' - interval '2920 days' * ((h * 7919 + k * 104729) % 100000) / 100000.0
  end
from generate_series(1, :users) as h
cross join generate_series(1, 2) as k;

insert into billing.stripe_refunds (id, payment_id, amount_cents, status, refund_created)
select 're_bench_' || p.id, p.id, 500, 'succeeded', p.paid_at + interval '3 days'
from billing.stripe_payments as p
where p.id like 'cs_bench_%_1' and hashtext(p.id) % 10 = 0;

insert into billing.stripe_disputes (id, payment_id, amount_cents, status, last_event_created)
select 'dp_bench_' || p.id, p.id, 1000, 'lost', p.paid_at + interval '20 days'
from billing.stripe_payments as p
where p.id like 'cs_bench_%_2' and hashtext(p.id) % 50 = 0;

-- Six states per subscription, 4 months apart (created, then updates), the last canceled for
-- every third of today's users and for every older one.
insert into billing.stripe_events (id, type, created, payload, status, processed_at)
select
  'evt_bench_' || h || '_' || s,
  case when s = 1 then 'customer.subscription.created'
    when s = 6 and (h % 3 = 0 or h > 1000) then 'customer.subscription.deleted'
    else 'customer.subscription.updated' end,
  t.at,
  jsonb_build_object('id', 'evt_bench_' || h || '_' || s, 'object', 'event',
    'data', jsonb_build_object('object', jsonb_build_object(
      'object', 'subscription', 'id', 'sub_bench' || h, 'customer', 'cus_bench' || h,
      'status', case when s = 6 and (h % 3 = 0 or h > 1000) then 'canceled' else 'active' end,
      'currency', case when h % 5 = 0 then 'eur' else 'usd' end,
      'items', jsonb_build_object('data', jsonb_build_array(jsonb_build_object(
        'quantity', 1 + s % 2,
        'price', jsonb_build_object('id', 'price_bench', 'unit_amount', 2900,
          'recurring', jsonb_build_object('interval', 'month', 'interval_count', 1))
      )))
    ))),
  'applied', now()
from generate_series(1, :users) as h
cross join generate_series(1, 6) as s
cross join lateral (
  select now() - case when h <= 1000 then interval '730 days' else interval '3650 days' end
    + interval '1 day' * ((h % 120) + (s - 1) * 120 + case when h > 1000 then h % 2000 else 0 end)
    as at
) as t;

vacuum analyze billing.stripe_payments;
vacuum analyze billing.stripe_refunds;
vacuum analyze billing.stripe_disputes;
vacuum analyze billing.stripe_events;
vacuum analyze billing.subscription_states;
-- The trigger rewrote each lifetime once per state: vacuumed as autovacuum would have.
vacuum analyze billing.subscription_lifetimes;
vacuum analyze billing.customers;
