-- Stripe events for the bench: real payloads from tests/fixtures/stripe
-- (stripe-ruby-mock-webhook_fixtures: anonymised captures of test-mode events), stored verbatim
-- in bench_stripe.templates by bench/stripe.py, and made into a fresh delivery per call by
-- bench_stripe.instance(): new event, object and payment ids, the creation time of now, and the
-- links the service puts on its own objects (client_reference_id, metadata.user_id,
-- metadata.product, a customer per user). Derived fields are listed per type below.
--
-- The mix (bench_stripe.slots, 10 slots): 4 checkout.session.completed (pack purchase: credit),
-- 2 customer.subscription.updated (upsert the subscription, sync the plan), 2 invoice.paid
-- (subscription_cycle grant: credit with expiry; the fixture is a manual invoice, so
-- billing_reason, subscription, the line period and fresh payment ids are derived), 1 charge.succeeded and
-- 1 payment_intent.succeeded (stored as ignored).
--
-- A pack checkout is one the service sold: where billing.stripe_sales exists (0.2 and later), the
-- sessions cs_bench<n> are recorded here beforehand, as the service records each session when it
-- creates it (not on the event's path), and each delivery takes the next one.
--
-- Events go to users 20001..30000, apart from the deduct workloads, whose bucket walk the
-- expiring subscription grants would otherwise change. Run as superuser.

create schema if not exists bench_stripe;

create table bench_stripe.templates (
  type text primary key,
  payload jsonb not null
);

create table bench_stripe.slots (
  slot integer primary key,
  type text not null
);

insert into bench_stripe.slots (slot, type)
values
(1, 'checkout.session.completed'),
(2, 'checkout.session.completed'),
(3, 'checkout.session.completed'),
(4, 'checkout.session.completed'),
(5, 'customer.subscription.updated'),
(6, 'customer.subscription.updated'),
(7, 'invoice.paid'),
(8, 'invoice.paid'),
(9, 'charge.succeeded'),
(10, 'payment_intent.succeeded');

create sequence bench_stripe.sessions;

do $$
begin
  if to_regclass('billing.stripe_sales') is not null then
    execute $sql$
      insert into billing.stripe_sales (
        id, kind, user_id, product_code, quantity, amount_cents, currency, livemode
      )
      select 'cs_bench' || n, 'checkout_session',
        lpad(to_hex(20001 + n % 10000), 32, '0')::uuid, 'pack_100', 1, 3000, 'usd', false
      from generate_series(1, 200000) as n
    $sql$;
  end if;
end;
$$;

create function bench_stripe.instance(p_slot integer, p_uid integer) returns jsonb
language plpgsql
volatile
as $$
declare
  v jsonb;
  v_type text;
  v_user text := lpad(to_hex(p_uid), 32, '0')::uuid::text;
  v_n text := replace(gen_random_uuid()::text, '-', '');
  v_customer text := 'cus_bench' || p_uid;
  v_now bigint := extract(epoch from clock_timestamp())::bigint;
  v_seq bigint;
begin
  select t.payload, t.type into v, v_type
  from bench_stripe.slots as s
  inner join bench_stripe.templates as t on t.type = s.type
  where s.slot = p_slot;

  v := v || jsonb_build_object('id', 'evt_bench' || v_n, 'created', v_now);
  case v_type
    when 'checkout.session.completed' then
      v_seq := nextval('bench_stripe.sessions');
      v_user := lpad(to_hex(20001 + v_seq % 10000), 32, '0')::uuid::text;
      v_customer := 'cus_bench' || (20001 + v_seq % 10000);
      v := jsonb_set(v, '{data,object}', v #> '{data,object}' || jsonb_build_object(
        'id', 'cs_bench' || v_seq,
        'payment_intent', 'pi_bench' || v_n,
        'customer', v_customer,
        'client_reference_id', v_user,
        'metadata', jsonb_build_object('user_id', v_user, 'product', 'pack_100')));
    when 'customer.subscription.updated' then
      v := jsonb_set(v, '{data,object}', v #> '{data,object}' || jsonb_build_object(
        'id', 'sub_bench' || p_uid,
        'customer', v_customer,
        'metadata', jsonb_build_object('user_id', v_user)));
    when 'invoice.paid' then
      v := jsonb_set(v, '{data,object}', v #> '{data,object}' || jsonb_build_object(
        'id', 'in_bench' || v_n,
        'customer', v_customer,
        'payment_intent', 'pi_bench' || v_n,
        'charge', 'ch_bench' || v_n,
        'billing_reason', 'subscription_cycle',
        'subscription', 'sub_bench' || p_uid,
        'subscription_details', jsonb_build_object(
          'metadata', jsonb_build_object('user_id', v_user))));
      v := jsonb_set(v, '{data,object,lines,data,0,period}', jsonb_build_object(
        'start', v_now, 'end', v_now + 30 * 86400));
    else
      v := jsonb_set(v, '{data,object,id}', to_jsonb(split_part(v #>> '{data,object,id}', '_', 1)
        || '_bench' || v_n));
  end case;
  return v;
end;
$$;

grant usage on schema bench_stripe to service_role;
grant select on all tables in schema bench_stripe to service_role;
grant execute on function bench_stripe.instance(integer, integer) to service_role;
grant usage on sequence bench_stripe.sessions to service_role;
