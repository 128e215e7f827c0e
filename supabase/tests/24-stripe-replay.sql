-- Parked events and their replay: redelivery retries a parked event, replay_parked_stripe_events()
-- applies what became resolvable (oldest first), and a replay that fails leaves the event parked.
begin;
set local search_path = extensions, public;
set local timezone = 'UTC';
select plan(23);

insert into auth.users (id, email) values
('00000000-0000-0000-0000-000000000241', 'late@example.com'),
('00000000-0000-0000-0000-000000000242', 'other@example.com');

update billing.products set stripe_price_id = 'price_000000000000000000000000'
where code = 'starter';

-- Fixtures: real Stripe payloads from tests/fixtures/stripe (see its README), trimmed to the
-- fields the handler reads; values unchanged. pg_temp.event() derives each test event from one,
-- and the patch it is given is the whole of the adaptation (ids, user, product metadata, ...).
create temp table stripe_fixtures (name text primary key, event jsonb not null) on commit drop;
grant select on stripe_fixtures to service_role;
insert into stripe_fixtures (name, event) values
-- stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json (full event)
('stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json', $json$
{
  "id": "evt_000000000000000000000000",
  "object": "event",
  "api_version": "2020-08-27",
  "created": 1648319959,
  "livemode": false,
  "type": "checkout.session.completed",
  "data": {
    "object": {
      "id": "cs_test_0000000000000000000000000000000000000000000000000000000000",
      "object": "checkout.session",
      "amount_total": 3000,
      "currency": "usd",
      "client_reference_id": null,
      "customer": "cus_00000000000000",
      "metadata": {},
      "mode": "payment",
      "payment_intent": "pi_000000000000000000000000",
      "payment_status": "paid",
      "status": "complete",
      "subscription": null
    }
  }
}
$json$),
-- openapi-fixtures3/refund.json (bare object)
('openapi-fixtures3/refund.json', $json$
{
  "data": {
    "object": {
      "id": "re_1Pgc72B7WZ01zgkWqPvrRrPE",
      "object": "refund",
      "amount": 100,
      "charge": "ch_1PgafuB7WZ01zgkWXYmPNZs8",
      "payment_intent": null,
      "status": "succeeded",
      "currency": "usd",
      "reason": null
    }
  }
}
$json$),
-- stripe-ruby-mock-webhook_fixtures/customer.subscription.created.json (full event)
('stripe-ruby-mock-webhook_fixtures/customer.subscription.created.json', $json$
{
  "id": "evt_000000000000000000000000",
  "object": "event",
  "api_version": "2020-08-27",
  "created": 1648320110,
  "livemode": false,
  "type": "customer.subscription.created",
  "data": {
    "object": {
      "id": "sub_000000000000000000000000",
      "object": "subscription",
      "customer": "cus_00000000000000",
      "status": "active",
      "current_period_start": 1648320110,
      "current_period_end": 1650998510,
      "cancel_at_period_end": false,
      "metadata": {},
      "items": {
        "object": "list",
        "data": [
          {
            "id": "si_00000000000000",
            "object": "subscription_item",
            "quantity": 1,
            "price": {
              "id": "price_000000000000000000000000",
              "object": "price",
              "product": "prod_00000000000000"
            }
          }
        ]
      }
    }
  }
}
$json$),
-- stripe-ruby-mock-webhook_fixtures/customer.subscription.updated.json (full event)
('stripe-ruby-mock-webhook_fixtures/customer.subscription.updated.json', $json$
{
  "id": "evt_000000000000000000000000",
  "object": "event",
  "api_version": "2020-08-27",
  "created": 1648320106,
  "livemode": false,
  "type": "customer.subscription.updated",
  "data": {
    "object": {
      "id": "sub_000000000000000000000000",
      "object": "subscription",
      "customer": "cus_00000000000000",
      "status": "active",
      "current_period_start": 1648320105,
      "current_period_end": 1650998505,
      "cancel_at_period_end": false,
      "metadata": {},
      "items": {
        "object": "list",
        "data": [
          {
            "id": "si_00000000000000",
            "object": "subscription_item",
            "quantity": 1,
            "price": {
              "id": "price_000000000000000000000000",
              "object": "price",
              "product": "prod_00000000000000"
            }
          }
        ]
      }
    }
  }
}
$json$);

-- Deep merge: objects merge key by key, anything else in p_patch replaces what is in p_base.
create function pg_temp.merge(p_base jsonb, p_patch jsonb) returns jsonb
language plpgsql immutable
as $$
begin
  if jsonb_typeof(p_base) <> 'object' or jsonb_typeof(p_patch) <> 'object' then
    return p_patch;
  end if;
  return coalesce((
    select jsonb_object_agg(k.key, case
      when p_base ? k.key and p_patch ? k.key then pg_temp.merge(p_base -> k.key, p_patch -> k.key)
      when p_patch ? k.key then p_patch -> k.key
      else p_base -> k.key
    end)
    from (select jsonb_object_keys(p_base) as key union select jsonb_object_keys(p_patch)) as k
  ), '{}');
end;
$$;

-- A test event derived from a fixture: its own id, type and created, and p_patch merged into
-- data.object. Data-only and bare-object fixtures get their envelope here.
create function pg_temp.event(
  p_fixture text, p_id text, p_type text, p_created bigint, p_patch jsonb default '{}'
) returns jsonb
language sql stable
as $$
  select pg_temp.merge(
    f.event,
    jsonb_build_object(
      'id', p_id, 'object', 'event', 'type', p_type, 'created', p_created,
      'data', jsonb_build_object('object', p_patch)
    )
  )
  from pg_temp.stripe_fixtures as f
  where f.name = p_fixture
$$;

set local role service_role;

-- Four events for a customer nobody has linked yet -----------------------------------------------
-- Derived from the ruby-mock checkout.session.completed: product set, no user named.
select results_eq(
  $$select status, detail from public.handle_stripe_event(pg_temp.event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_24_checkout', 'checkout.session.completed', 1700000000,
    '{"id": "cs_24Late", "customer": "cus_24Late", "payment_intent": "pi_24Late", "amount_total": 500,
      "metadata": {"product": "pack_100"}}'))$$,
  $$values ('parked'::text, 'checkout session cs_24Late: no user: no client_reference_id nor metadata.user_id, '
    'customer cus_24Late is not linked (link_stripe_customer)'::text)$$,
  'a paid session of an unlinked customer should be parked'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_24_checkout', 'checkout.session.completed', 1700000000,
    '{"id": "cs_24Late", "customer": "cus_24Late", "payment_intent": "pi_24Late", "amount_total": 500,
      "metadata": {"product": "pack_100"}}'))$$,
  $$values ('parked'::text)$$,
  'a redelivered parked event should be tried again (and stay parked)'
);
select results_eq(
  $$select status, attempts from billing.stripe_events where id = 'evt_24_checkout'$$,
  $$values ('parked'::text, 2)$$,
  'each delivery of a parked event should count an attempt'
);
-- Derived from the openapi refund: half of that purchase refunded, before the purchase is known.
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.event(
    'openapi-fixtures3/refund.json', 'evt_24_refund', 'refund.created', 1700000100,
    '{"id": "re_24Late", "amount": 250, "charge": "ch_24Late", "payment_intent": "pi_24Late"}'))$$,
  $$values ('parked'::text)$$,
  'a refund arriving before its purchase is recorded should be parked'
);
-- Derived from the ruby-mock subscription events: created active, then updated past_due.
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.created.json',
    'evt_24_sub_created', 'customer.subscription.created', 1700000200,
    '{"id": "sub_24Late", "customer": "cus_24Late"}'))$$,
  $$values ('parked'::text)$$,
  'a subscription of an unlinked customer should be parked'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.updated.json',
    'evt_24_sub_updated', 'customer.subscription.updated', 1700000300,
    '{"id": "sub_24Late", "customer": "cus_24Late", "status": "past_due"}'))$$,
  $$values ('parked'::text)$$,
  'its update should be parked too'
);

-- Replay before anything changed: still parked.
select results_eq(
  $$select event_id, type, status from public.replay_parked_stripe_events()$$,
  $$values ('evt_24_checkout'::text, 'checkout.session.completed'::text, 'parked'::text),
    ('evt_24_refund', 'refund.created', 'parked'),
    ('evt_24_sub_created', 'customer.subscription.created', 'parked'),
    ('evt_24_sub_updated', 'customer.subscription.updated', 'parked')$$,
  'a replay with nothing resolved should leave every event parked, oldest first'
);
select results_eq(
  $$select attempts from billing.stripe_events where id = 'evt_24_checkout'$$,
  $$values (3)$$,
  'a replay should count an attempt'
);
select is(
  (
    select balance from billing.accounts
    where user_id = '00000000-0000-0000-0000-000000000241'
  ),
  100::bigint,
  'nothing should be credited while the events are parked'
);

-- The customer link appears; replay applies everything, oldest first.
select results_eq(
  $$select status from public.link_stripe_customer('00000000-0000-0000-0000-000000000241', 'cus_24Late')$$,
  $$values ('applied'::text)$$,
  'the service should link the customer'
);
select results_eq(
  $$select event_id, status from public.replay_parked_stripe_events()$$,
  $$values ('evt_24_checkout'::text, 'applied'::text), ('evt_24_refund', 'applied'),
    ('evt_24_sub_created', 'applied'), ('evt_24_sub_updated', 'applied')$$,
  'a replay after the link should apply every event, oldest first (the subscription''s two in order)'
);
select results_eq(
  $$select kind, amount, idempotency_key from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-000000000241' order by id$$,
  $$values ('signup'::text, 100::bigint, 'signup:00000000-0000-0000-0000-000000000241'::text),
    ('purchase', 100, 'stripe:checkout:cs_24Late'), ('clawback', -50, 'stripe:clawback:cs_24Late:50')$$,
  'the replayed purchase should be credited and the replayed refund clawed back after it'
);
select results_eq(
  $$select plan, subscription_status from billing.accounts
    where user_id = '00000000-0000-0000-0000-000000000241'$$,
  $$values ('starter'::text, 'past_due'::text)$$,
  'the replayed subscription events should leave the account as the newer one says'
);
select results_eq(
  $$select id, status, attempts from billing.stripe_events where id like 'evt_24_%' order by id$$,
  $$values ('evt_24_checkout'::text, 'applied'::text, 4), ('evt_24_refund', 'applied', 3),
    ('evt_24_sub_created', 'applied', 3), ('evt_24_sub_updated', 'applied', 3)$$,
  'replayed events should be stored with their new status and attempts'
);
select is_empty(
  $$select * from public.replay_parked_stripe_events()$$,
  'a replay with nothing parked should return nothing'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_24_checkout', 'checkout.session.completed', 1700000000,
    '{"id": "cs_24Late", "customer": "cus_24Late", "payment_intent": "pi_24Late", "amount_total": 500,
      "metadata": {"product": "pack_100"}}'))$$,
  $$values ('duplicate'::text)$$,
  'a redelivery after the replay applied the event should answer duplicate'
);

-- A replay that fails stays parked ---------------------------------------------------------------
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_24_broken', 'checkout.session.completed', 1700000400,
    '{"id": "cs_24Broken", "customer": "cus_24Broken", "payment_intent": "pi_24Broken",
      "metadata": {"product": "pack_100"}}'))$$,
  $$values ('parked'::text)$$,
  'another unlinked session should be parked'
);
-- The owner wrote the session's ledger key by hand, for another user, dressed as a Stripe credit
-- (no caller of the RPCs can: add_tokens refuses stripe: keys with 22023).
reset role;
select results_eq(
  $$select status from billing.credit(
    '00000000-0000-0000-0000-000000000242', 100, 'stripe:checkout:cs_24Broken', 'purchase',
    null, null, '{"stripe_event_id": "evt_24_by_hand"}')$$,
  $$values ('applied'::text)$$,
  'a credit written by the owner should take the session''s ledger key for another user'
);
set local role service_role;
select results_eq(
  $$select status from public.link_stripe_customer('00000000-0000-0000-0000-000000000241', 'cus_24Broken')$$,
  $$values ('applied'::text)$$,
  'the customer should then be linked'
);
select results_eq(
  $$select event_id, status, detail like 'replay failed: TBKEY idempotency key%'
    from public.replay_parked_stripe_events()$$,
  $$values ('evt_24_broken'::text, 'parked'::text, true)$$,
  'a replay whose effect raises should leave the event parked with the error'
);
select is_empty(
  $$select 1 from billing.stripe_payments where id = 'cs_24Broken'$$,
  'a failed replay should leave no partial effect'
);
select results_eq(
  $$select status, attempts from billing.stripe_events where id = 'evt_24_broken'$$,
  $$values ('parked'::text, 2)$$,
  'the failed replay should be counted as an attempt'
);
reset role;

select is_empty(
  $$select * from billing.check_invariants()$$,
  'the ledger invariants should hold after every replay'
);

select * from finish();
rollback;
