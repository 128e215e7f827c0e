-- A Pro subscriber crosses 20% of the period's tokens: the notification, the auto top-up the
-- service charges, and the pack landing when Stripe confirms the payment. Every statement is one
-- the service (or Stripe, through the webhook) makes; run it with psql as the database owner on
-- a database with token-billing and supabase/seed.sql (tests/test_examples.py runs it and
-- compares what it prints with walkthrough.out).
\set user '''00000000-0000-0000-0000-00000000a017'''
\pset footer off
\pset format aligned
\pset tuples_only off

-- Maya signs up and subscribes to Pro (customer.subscription.created sets the plan, invoice.paid
-- grants the period's 25,000 tokens); the service created her Stripe customer first.
insert into auth.users (id, email, aud, role)
values (:user, 'maya@example.com', 'authenticated', 'authenticated');
update billing.accounts set plan = 'pro', subscription_status = 'active' where user_id = :user;
select status from public.link_stripe_customer(:user, 'cus_walkthrough');
select status, balance from public.add_tokens(:user, 25000, 'walkthrough-grant', 'subscription');

-- Her agents use 20,100 tokens: 5,000 is 20% of Pro's 25,000, so this call crosses it.
select status, balance from public.deduct_tokens(:user, 20000, 'agent-run-1');
select status, balance from public.deduct_tokens(:user, 100, 'agent-run-2');

-- One notification, which her browser receives on Realtime and the host's webhook gets signed.
select kind, message from billing.notifications where user_id = :user;

-- One auto top-up request for the crossing: Pro buys pack_600 ($20.00) off-session.
select n, product_code, amount_cents, status from billing.auto_top_ups where user_id = :user;

-- The service's billing worker claims it and charges her saved card (PaymentIntent with
-- off_session and confirm, idempotency key tb-auto-top-up-<id>); Stripe answers succeeded, and
-- the worker reports it with the PaymentIntent as Stripe returned it.
select id as top_up, idempotency_key like 'tb-auto-top-up-%' as keyed
from public.claim_auto_top_ups() \gset
select :'keyed' as one_key_per_crossing;
select status from public.finish_auto_top_up(:'top_up', 'succeeded', jsonb_build_object(
  'id', 'pi_walkthrough', 'object', 'payment_intent', 'amount', 2000, 'currency', 'usd',
  'status', 'succeeded', 'customer', 'cus_walkthrough', 'livemode', false,
  'metadata', jsonb_build_object('user_id', :user, 'product', 'pack_600', 'quantity', '1',
    'token_billing_auto_top_up', :'top_up')));

-- Stripe's payment_intent.succeeded (delivered twice, as Stripe may) credits the pack once.
select status, detail from public.handle_stripe_event(jsonb_build_object(
  'id', 'evt_walkthrough', 'object', 'event', 'type', 'payment_intent.succeeded',
  'created', 1767225600, 'livemode', false, 'api_version', '2024-06-20',
  'data', jsonb_build_object('object', jsonb_build_object(
    'id', 'pi_walkthrough', 'object', 'payment_intent', 'amount', 2000, 'amount_received', 2000,
    'currency', 'usd', 'status', 'succeeded', 'customer', 'cus_walkthrough', 'livemode', false,
    'metadata', jsonb_build_object('user_id', :user, 'product', 'pack_600', 'quantity', '1',
      'token_billing_auto_top_up', :'top_up')))));
select status from public.handle_stripe_event(jsonb_build_object(
  'id', 'evt_walkthrough', 'object', 'event', 'type', 'payment_intent.succeeded',
  'created', 1767225600, 'livemode', false, 'api_version', '2024-06-20',
  'data', jsonb_build_object('object', jsonb_build_object(
    'id', 'pi_walkthrough', 'object', 'payment_intent', 'amount', 2000, 'amount_received', 2000,
    'currency', 'usd', 'status', 'succeeded', 'customer', 'cus_walkthrough', 'livemode', false,
    'metadata', jsonb_build_object('user_id', :user, 'product', 'pack_600', 'quantity', '1',
      'token_billing_auto_top_up', :'top_up')))));

select balance, plan from billing.accounts where user_id = :user;
select kind, message from billing.notifications where user_id = :user order by created_at, kind;
