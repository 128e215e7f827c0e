-- pgtap_helpers.sql: what the pgTAP files in supabase/tests share, once, in a schema `tests`
-- (the supabase_test_helpers / basejump habit): test users, the Stripe fixtures and the events
-- derived from them, the ledger invariants as an assertion.
--
-- Test-only. scripts/pgcluster.py's build_template loads it as role postgres into the test
-- template after the migrations; `make dev`'s database and the shipped SQL (supabase/migrations,
-- sql/token_billing.sql) never contain it. The pgTAP files run as postgres and call the Stripe
-- helpers as service_role too, so both may use the schema; anon and authenticated may not.

create schema tests;
comment on schema tests is 'pgTAP helpers (tests/sql/pgtap_helpers.sql): the test template only, never shipped.';

-- Users ------------------------------------------------------------------------------------------

create function tests.create_user(p_user_id uuid, p_email text default null) returns uuid
language sql
set search_path = ''
as $$
  insert into auth.users (id, email, aud, role)
  values (p_user_id, coalesce(p_email, p_user_id || '@example.com'), 'authenticated', 'authenticated')
  returning id
$$;
comment on function tests.create_user(uuid, text) is
'A user as Supabase Auth writes one (aud and role authenticated); the signup trigger opens its account.';

create function tests.balance(p_user_id uuid) returns bigint
language sql stable
set search_path = ''
as $$
  select a.balance from billing.accounts as a where a.user_id = p_user_id
$$;
comment on function tests.balance(uuid) is 'The balance of one account (null when it has none).';

-- The ledger invariants --------------------------------------------------------------------------

-- pgTAP's functions call each other unqualified, so its schema is on the path.
create function tests.invariants_hold(p_description text) returns text
language sql
set search_path = extensions
as $$
  select extensions.is_empty('select * from billing.check_invariants()', p_description)
$$;
comment on function tests.invariants_hold(text) is
'A pgTAP assertion: billing.check_invariants() finds nothing (its rows are the diagnostics when it does).';

-- Stripe fixtures --------------------------------------------------------------------------------
-- Real Stripe payloads from tests/fixtures/stripe (see its README), trimmed to the fields the
-- handler reads; values unchanged (tests/test_pgtap.py checks each against the vendored file).
-- tests.stripe_event() derives each test event from one, and the patch it is given is the whole
-- of the adaptation (ids, user, product metadata, ...).
create table tests.stripe_fixtures (
  name text primary key,
  event jsonb not null
);
comment on table tests.stripe_fixtures is
'Trimmed copies of the vendored Stripe fixtures, by their path under tests/fixtures/stripe.';
comment on column tests.stripe_fixtures.name is 'The fixture''s path under tests/fixtures/stripe.';
comment on column tests.stripe_fixtures.event is
'The payload trimmed to what the handler reads; data-only and bare objects sit under data.';

insert into tests.stripe_fixtures (name, event) values
-- stripe-ruby-mock-webhook_fixtures/charge.dispute.closed.json (full event)
('stripe-ruby-mock-webhook_fixtures/charge.dispute.closed.json', $json$
{
  "id": "evt_00000000000000",
  "object": "event",
  "created": 1326853478,
  "livemode": false,
  "type": "charge.dispute.closed",
  "data": {
    "object": {
      "object": "dispute",
      "amount": 1000,
      "charge": "ch_00000000000000",
      "status": "won",
      "currency": "usd",
      "reason": "general"
    }
  }
}
$json$),
-- stripe-ruby-mock-webhook_fixtures/charge.dispute.created.json (full event)
('stripe-ruby-mock-webhook_fixtures/charge.dispute.created.json', $json$
{
  "id": "evt_000000000000000000000000",
  "object": "event",
  "api_version": "2020-08-27",
  "created": 1648319940,
  "livemode": false,
  "type": "charge.dispute.created",
  "data": {
    "object": {
      "id": "dp_000000000000000000000000",
      "object": "dispute",
      "amount": 100,
      "charge": "ch_000000000000000000000000",
      "payment_intent": null,
      "status": "warning_needs_response",
      "currency": "usd",
      "reason": "fraudulent"
    }
  }
}
$json$),
-- stripe-ruby-mock-webhook_fixtures/charge.dispute.updated.json (full event)
('stripe-ruby-mock-webhook_fixtures/charge.dispute.updated.json', $json$
{
  "id": "evt_00000000000000",
  "object": "event",
  "created": 1326853478,
  "livemode": false,
  "type": "charge.dispute.updated",
  "data": {
    "object": {
      "object": "dispute",
      "amount": 1000,
      "charge": "ch_00000000000000",
      "status": "under_review",
      "currency": "usd",
      "reason": "general"
    }
  }
}
$json$),
-- stripe-ruby-mock-webhook_fixtures/charge.refunded.json (full event)
('stripe-ruby-mock-webhook_fixtures/charge.refunded.json', $json$
{
  "id": "evt_000000000000000000000000",
  "object": "event",
  "api_version": "2020-08-27",
  "created": 1648319949,
  "livemode": false,
  "type": "charge.refunded",
  "data": {
    "object": {
      "id": "ch_000000000000000000000000",
      "object": "charge",
      "amount": 100,
      "amount_captured": 100,
      "amount_refunded": 100,
      "currency": "usd",
      "customer": null,
      "payment_intent": null,
      "refunded": true,
      "status": "succeeded",
      "refunds": {
        "object": "list",
        "data": [
          {
            "id": "re_000000000000000000000000",
            "object": "refund",
            "amount": 100,
            "charge": "ch_000000000000000000000000",
            "payment_intent": null,
            "status": "succeeded"
          }
        ]
      }
    }
  }
}
$json$),
-- stripe-ruby-mock-webhook_fixtures/charge.succeeded.json (full event)
('stripe-ruby-mock-webhook_fixtures/charge.succeeded.json', $json$
{
  "id": "evt_000000000000000000000000",
  "object": "event",
  "api_version": "2020-08-27",
  "created": 1648320032,
  "livemode": false,
  "type": "charge.succeeded",
  "data": {
    "object": {
      "id": "ch_000000000000000000000000",
      "object": "charge",
      "amount": 2000,
      "amount_captured": 2000,
      "amount_refunded": 0,
      "currency": "usd",
      "customer": null,
      "payment_intent": "pi_000000000000000000000000",
      "refunded": false,
      "status": "succeeded",
      "refunds": {"object": "list", "data": []}
    }
  }
}
$json$),
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
-- stripe-ruby-mock-webhook_fixtures/checkout.session.completed.setup_mode.json (full event)
('stripe-ruby-mock-webhook_fixtures/checkout.session.completed.setup_mode.json', $json$
{
  "id": "evt_00000000000000",
  "object": "event",
  "created": 1326853478,
  "livemode": false,
  "type": "checkout.session.completed",
  "data": {
    "object": {
      "id": "cs_00000000000000",
      "object": "checkout.session",
      "amount_total": null,
      "currency": null,
      "client_reference_id": null,
      "customer": null,
      "metadata": {},
      "mode": "setup",
      "payment_intent": null,
      "payment_status": "no_payment_required",
      "subscription": null
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
-- stripe-ruby-mock-webhook_fixtures/customer.subscription.deleted.json (full event)
('stripe-ruby-mock-webhook_fixtures/customer.subscription.deleted.json', $json$
{
  "id": "evt_000000000000000000000000",
  "object": "event",
  "api_version": "2020-08-27",
  "created": 1648320097,
  "livemode": false,
  "type": "customer.subscription.deleted",
  "data": {
    "object": {
      "id": "sub_000000000000000000000000",
      "object": "subscription",
      "customer": "cus_00000000000000",
      "status": "canceled",
      "current_period_start": 1648320096,
      "current_period_end": 1650998496,
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
$json$),
-- stripe-ruby-mock-webhook_fixtures/invoice.paid.json (full event)
('stripe-ruby-mock-webhook_fixtures/invoice.paid.json', $json$
{
  "id": "evt_000000000000000000000000",
  "object": "event",
  "api_version": "2020-08-27",
  "created": 1648320015,
  "livemode": false,
  "type": "invoice.paid",
  "data": {
    "object": {
      "id": "in_000000000000000000000000",
      "object": "invoice",
      "amount_paid": 2000,
      "billing_reason": "manual",
      "charge": "ch_000000000000000000000000",
      "currency": "usd",
      "customer": "cus_00000000000000",
      "payment_intent": "pi_000000000000000000000000",
      "status": "paid",
      "subscription": null,
      "lines": {
        "object": "list",
        "data": [
          {
            "id": "il_000000000000000000000000",
            "object": "line_item",
            "type": "invoiceitem",
            "period": {"end": 1648320011, "start": 1648320011},
            "quantity": 1,
            "subscription": null,
            "metadata": {},
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
-- stripe-ruby-mock-webhook_fixtures/invoice.payment_succeeded.json (full event)
('stripe-ruby-mock-webhook_fixtures/invoice.payment_succeeded.json', $json$
{
  "id": "evt_000000000000000000000000",
  "object": "event",
  "api_version": "2020-08-27",
  "created": 1648320015,
  "livemode": false,
  "type": "invoice.payment_succeeded",
  "data": {
    "object": {
      "id": "in_000000000000000000000000",
      "object": "invoice",
      "amount_paid": 2000,
      "billing_reason": "manual",
      "charge": "ch_000000000000000000000000",
      "currency": "usd",
      "customer": "cus_00000000000000",
      "payment_intent": "pi_000000000000000000000000",
      "status": "paid",
      "subscription": null,
      "lines": {
        "object": "list",
        "data": [
          {
            "id": "il_000000000000000000000000",
            "object": "line_item",
            "type": "invoiceitem",
            "period": {"end": 1648320011, "start": 1648320011},
            "quantity": 1,
            "subscription": null,
            "metadata": {},
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
-- pay-rails-stripe/checkout.session.completed.json (event.data only)
('pay-rails-stripe/checkout.session.completed.json', $json$
{
  "data": {
    "object": {
      "id": "cs_test_a1UejXx8ebIdTzFolicVypUAZpOBVkoQKDbaarXoPlPVtj8p0zujPEEhjT",
      "object": "checkout.session",
      "amount_total": 1900,
      "currency": "usd",
      "client_reference_id": null,
      "customer": "cus_M5wW9RPFk9xNZ5",
      "metadata": {},
      "mode": "subscription",
      "payment_intent": null,
      "payment_status": "paid",
      "status": "complete",
      "subscription": "sub_1LNkeSKXBGcbgpbZ7jMqOPSi"
    }
  }
}
$json$),
-- pay-rails-stripe/invoice.payment_failed.json (event.data only)
('pay-rails-stripe/invoice.payment_failed.json', $json$
{
  "data": {
    "object": {
      "id": "in_1234",
      "object": "invoice",
      "amount_paid": 0,
      "billing_reason": "subscription_cycle",
      "currency": "usd",
      "customer": "cus_1234",
      "status": "open",
      "parent": {
        "quote_details": null,
        "subscription_details": {"metadata": {"license_id": "0"}, "subscription": "sub_1234"},
        "type": "subscription_details"
      },
      "lines": {
        "object": "list",
        "data": [
          {
            "id": "il_1234",
            "object": "line_item",
            "period": {"end": 1776969906, "start": 1745433906},
            "quantity": 1,
            "parent": {
              "invoice_item_details": null,
              "subscription_item_details": {
                "invoice_item": null,
                "proration": false,
                "proration_details": {"credited_items": null},
                "subscription": "sub_1234",
                "subscription_item": "si_1234"
              },
              "type": "subscription_item_details"
            },
            "metadata": {"license_id": "0"},
            "pricing": {
              "price_details": {"price": "price_1234", "product": "prod_1234"},
              "type": "price_details",
              "unit_amount_decimal": "24900"
            }
          }
        ]
      }
    }
  }
}
$json$),
-- pay-rails-stripe/subscription.updated.json (event.data only)
('pay-rails-stripe/subscription.updated.json', $json$
{
  "data": {
    "object": {
      "id": "sub_00000000000000",
      "object": "subscription",
      "customer": "cus_00000000000000",
      "status": "canceled",
      "cancel_at_period_end": false,
      "metadata": {},
      "items": {
        "object": "list",
        "data": [
          {
            "id": "si_00000000000000",
            "object": "subscription_item",
            "current_period_start": 1486568724,
            "current_period_end": 1488987924,
            "quantity": 2,
            "price": {
              "id": "FFBEGINNER_00000000000000",
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
$json$);

create function tests.stripe_fixture(p_name text) returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  v_event jsonb;
begin
  select f.event into v_event from tests.stripe_fixtures as f where f.name = p_name;
  if v_event is null then
    raise exception 'no Stripe fixture % in tests.stripe_fixtures', p_name;
  end if;
  return v_event;
end;
$$;
comment on function tests.stripe_fixture(text) is
'The trimmed fixture as it is; an unknown name raises instead of handing the handler a null.';

-- Deep merge: objects merge key by key, anything else in p_patch replaces what is in p_base.
create function tests.merge(p_base jsonb, p_patch jsonb) returns jsonb
language plpgsql immutable
set search_path = ''
as $$
begin
  if jsonb_typeof(p_base) <> 'object' or jsonb_typeof(p_patch) <> 'object' then
    return p_patch;
  end if;
  return coalesce((
    select jsonb_object_agg(k.key, case
      when p_base ? k.key and p_patch ? k.key then tests.merge(p_base -> k.key, p_patch -> k.key)
      when p_patch ? k.key then p_patch -> k.key
      else p_base -> k.key
    end)
    from (select jsonb_object_keys(p_base) as key union select jsonb_object_keys(p_patch)) as k
  ), '{}');
end;
$$;
comment on function tests.merge(jsonb, jsonb) is
'Deep merge: objects merge key by key, anything else in p_patch replaces what is in p_base.';

-- A test event derived from a fixture: its own id, type and created, and p_patch merged into
-- data.object. Data-only and bare-object fixtures get their envelope here.
create function tests.stripe_event(
  p_fixture text, p_id text, p_type text, p_created bigint, p_patch jsonb default '{}'
) returns jsonb
language sql stable
set search_path = ''
as $$
  select tests.merge(
    tests.stripe_fixture(p_fixture),
    jsonb_build_object(
      'id', p_id, 'object', 'event', 'type', p_type, 'created', p_created,
      'data', jsonb_build_object('object', p_patch)
    )
  )
$$;
comment on function tests.stripe_event(text, text, text, bigint, jsonb) is
'A test event derived from a fixture: its own id, type and created, p_patch merged into data.object.';

-- A checkout event whose session the service sold: records data.object the way the service does
-- (public.record_checkout_session, before the URL is handed out), then returns the event. A
-- session that does not name a user and a product the way the service's do stays unrecorded.
create function tests.sold(p_event jsonb) returns jsonb
language plpgsql
set search_path = ''
as $$
begin
  begin
    perform public.record_checkout_session(p_event #> '{data,object}');
  exception when sqlstate '22023' then
    null;
  end;
  return p_event;
end;
$$;
comment on function tests.sold(jsonb) is
'Records the event''s checkout session as the service would (when it names user and product), '
'then returns the event.';

-- Privileges -------------------------------------------------------------------------------------
revoke execute on all functions in schema tests from public;
grant usage on schema tests to service_role;
grant select on tests.stripe_fixtures to service_role;
grant execute on all functions in schema tests to service_role;
