-- Migration: handle_stripe_event and apply_stripe_event with Stripe Connect (the marketplace).
--
-- Purpose: main's 20261202200150_stripe_dispatch_v2.sql versions, with the marketplace's
-- branches added in blocks marked "Connect (issue 19)" and nothing else changed:
--   apply_stripe_event: account.updated and account.application.deauthorized
--     (billing.apply_account_event); checkout.session.* of a recorded agent sale
--     (billing.apply_marketplace_checkout_event), checked before the token-pack path;
--     charge.succeeded / charge.updated, refund and dispute events of a marketplace sale (by
--     payment intent or charge: billing.apply_marketplace_*_event), checked before the token
--     paths; transfer.reversed / transfer.updated (billing.apply_transfer_event).
--   handle_stripe_event: an event with `account` set is applied when the account is a known
--     creator's (billing.creators) and the event is one of the account's own
--     (account.updated, account.application.deauthorized); other events of a known connected
--     account, and every event of an unknown one, are stored ignored with the reason, as before.
-- Objects: billing.apply_stripe_event(), public.handle_stripe_event().

create or replace function billing.apply_stripe_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_type text := p_event ->> 'type';
  -- Connect (issue 19): the marketplace sale an event is about.
  v_sale_id text;
begin
  -- Connect (issue 19): the marketplace's events, before the token paths. ------------------
  if v_type in ('account.updated', 'account.application.deauthorized') then
    return query select * from billing.apply_account_event(p_event);
    return;
  elsif v_type in ('transfer.reversed', 'transfer.updated') then
    return query select * from billing.apply_transfer_event(p_event);
    return;
  elsif v_type like 'checkout.session.%' then
    v_sale_id := (
      select s.id from billing.marketplace_sales as s where s.id = p_event #>> '{data,object,id}'
    );
    if v_sale_id is not null then
      return query select * from billing.apply_marketplace_checkout_event(p_event, v_sale_id);
      return;
    end if;
  elsif v_type in (
    'charge.succeeded', 'charge.updated', 'charge.refunded', 'refund.created', 'refund.updated',
    'refund.failed', 'charge.refund.updated', 'charge.dispute.created', 'charge.dispute.updated',
    'charge.dispute.closed', 'charge.dispute.funds_withdrawn', 'charge.dispute.funds_reinstated'
  ) then
    v_sale_id := billing.marketplace_sale_for_event(p_event);
    if v_sale_id is not null and v_type in ('charge.succeeded', 'charge.updated') then
      return query select * from billing.apply_marketplace_charge_event(p_event, v_sale_id);
      return;
    elsif v_sale_id is not null and v_type like 'charge.dispute.%' then
      return query select * from billing.apply_marketplace_dispute_event(p_event, v_sale_id);
      return;
    elsif v_sale_id is not null then
      return query select * from billing.apply_marketplace_refund_event(p_event, v_sale_id);
      return;
    end if;
  end if;
  -- End of Connect (issue 19). -----------------------------------------------------------------

  if v_type in (
    'checkout.session.completed', 'checkout.session.async_payment_succeeded',
    'checkout.session.async_payment_failed', 'checkout.session.expired'
  ) then
    return query select * from billing.apply_checkout_session_event(p_event);
  elsif v_type = 'payment_intent.succeeded' then
    return query select * from billing.apply_payment_intent_event(p_event);
  elsif v_type in ('invoice.paid', 'invoice.payment_succeeded') then
    return query select * from billing.apply_invoice_paid_event(p_event);
  elsif v_type = 'invoice_payment.paid' then
    return query select * from billing.apply_invoice_payment_event(p_event);
  elsif v_type in ('invoice.voided', 'invoice.marked_uncollectible') then
    return query select * from billing.apply_invoice_closed_event(p_event);
  elsif v_type = 'invoice.payment_failed' then
    return query select * from billing.apply_invoice_payment_failed_event(p_event);
  elsif v_type in (
    'customer.subscription.created', 'customer.subscription.updated',
    'customer.subscription.deleted', 'customer.subscription.paused',
    'customer.subscription.resumed'
  ) then
    return query select * from billing.apply_subscription_event(p_event);
  elsif v_type = 'customer.deleted' then
    return query select * from billing.apply_customer_deleted_event(p_event);
  elsif v_type in (
    'charge.refunded', 'refund.created', 'refund.updated', 'refund.failed',
    'charge.refund.updated'
  ) then
    return query select * from billing.apply_refund_event(p_event);
  elsif v_type in (
    'charge.dispute.created', 'charge.dispute.updated', 'charge.dispute.closed',
    'charge.dispute.funds_withdrawn', 'charge.dispute.funds_reinstated'
  ) then
    return query select * from billing.apply_dispute_event(p_event);
  else
    return query select 'ignored'::text, format('%s events are not handled', v_type);
  end if;
end;
$$;

comment on function billing.apply_stripe_event(jsonb) is
'Decides and applies the effect of a validated event (docs/stripe-events.md) and '
'returns the outcome; the one decision path of handle_stripe_event and of replays. Connect: '
'account, transfer and marketplace-sale events go to the marketplace''s functions.';


-- The RPCs --------------------------------------------------------------------------------------

create or replace function public.handle_stripe_event(
  p_event jsonb
) returns table (status text, detail text)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_event_id text;
  v_stored billing.stripe_events;
  v_payload jsonb := p_event;
  v_attempts integer := 1;
  v_status text;
  v_detail text;
  v_sqlstate text;
  v_message text;
  v_refs text[];
  v_livemode boolean := coalesce((select s.stripe_livemode from billing.settings as s), false);
begin
  perform billing.require_stripe_event(p_event);
  v_event_id := p_event ->> 'id';

  -- The insert is the exactly-once gate: a concurrent delivery of the same event waits here
  -- until this transaction ends, then finds the row.
  insert into billing.stripe_events (id, type, api_version, created, livemode, payload)
  values (
    v_event_id, p_event ->> 'type', p_event ->> 'api_version',
    to_timestamp(billing.stripe_bigint(p_event -> 'created', 'p_event.created')),
    coalesce((p_event ->> 'livemode')::boolean, false), p_event
  )
  on conflict (id) do nothing;

  if not found then
    select e.* into v_stored from billing.stripe_events as e where e.id = v_event_id for update;
    if v_stored.status <> 'parked' then
      return query select 'duplicate'::text, format('event %s was already handled: %s (%s)',
        v_event_id, v_stored.status, v_stored.detail);
      return;
    end if;
    -- A parked event is tried again on every delivery, from the payload first stored.
    v_payload := v_stored.payload;
    v_attempts := v_stored.attempts + 1;
  end if;

  begin
    if coalesce((v_payload ->> 'livemode')::boolean, false) <> v_livemode then
      -- A signed event of the other mode (a test-mode event on a live deployment) never credits.
      v_status := 'ignored';
      v_detail := format('event %s is %s, this deployment is %s (billing.settings.stripe_livemode)',
        v_event_id,
        case when coalesce((v_payload ->> 'livemode')::boolean, false) then 'live mode' else 'test mode' end,
        case when v_livemode then 'live mode' else 'test mode' end);
    -- Connect (issue 19): a known creator's account events apply; nothing else of a connected
    -- account does (its owner wrote the metadata, it pays this deployment nothing).
    elsif nullif(v_payload ->> 'account', '') is not null
      and v_payload ->> 'type' in ('account.updated', 'account.application.deauthorized')
      and exists (
        select 1 from billing.creators as c where c.stripe_account_id = v_payload ->> 'account'
      ) then
      select a.status, a.detail into v_status, v_detail from billing.apply_stripe_event(v_payload) as a;
    elsif nullif(v_payload ->> 'account', '') is not null then
      v_status := 'ignored';
      v_detail := case
        when exists (
          select 1 from billing.creators as c where c.stripe_account_id = v_payload ->> 'account'
        ) then format('event %s (%s) of creator account %s: only account.updated and '
          'account.application.deauthorized of a connected account are handled', v_event_id,
          v_payload ->> 'type', v_payload ->> 'account')
        else format('event %s belongs to connected account %s, which this deployment does '
          'not bill for', v_event_id, v_payload ->> 'account')
      end;
    -- End of Connect (issue 19).
    else
      select a.status, a.detail into v_status, v_detail from billing.apply_stripe_event(v_payload) as a;
    end if;
  exception when data_exception or check_violation or not_null_violation then
    -- A value the records cannot hold (an object id of the wrong shape, a date out of range):
    -- the event is malformed, like the ones require_stripe_event refuses, and so is refused
    -- the same way (22023, nothing stored) rather than failing as an internal error.
    get stacked diagnostics v_sqlstate = returned_sqlstate, v_message = message_text;
    if v_sqlstate = '22023' then
      raise;
    end if;
    raise exception using
      errcode = '22023',
      message = format('p_event %s cannot be applied: %s (%s)', v_event_id, v_message, v_sqlstate);
  end;

  v_refs := billing.stripe_event_refs(v_payload);
  update billing.stripe_events as e
  set
    status = v_status,
    detail = v_detail,
    attempts = v_attempts,
    processed_at = now(),
    waiting_for = case when v_status = 'parked' then v_refs end
  where e.id = v_event_id;

  if v_status = 'applied' then
    -- Events parked for an object this one made appear apply now, in this transaction. A
    -- payment's payment intent and charge count as appearing with it.
    v_refs := v_refs || coalesce((
      select array_remove(array_remove(
        array_agg(p.stripe_payment_intent_id) || array_agg(p.stripe_charge_id), null), null)
      from billing.stripe_payments as p
      where p.id = any (v_refs)
    ), '{}');
    perform billing.heal_parked_stripe_events(v_refs, v_event_id);
  end if;

  return query select v_status, v_detail;
end;
$$;

comment on function public.handle_stripe_event(jsonb) is
'Handles one Stripe (v1 snapshot) event exactly once: stores it and applies its effect in one '
'transaction. Statuses: applied, duplicate, ignored, stale, parked (redelivery retries a parked '
'event). Events of a connected account apply only when it is a known creator''s account event '
'(account.updated, account.application.deauthorized); otherwise they are ignored with the '
'reason. Raises 22023, storing nothing, for a malformed or thin event.';

insert into billing.schema_migrations (version, name) values ('20261202800900', 'connect_dispatch');
