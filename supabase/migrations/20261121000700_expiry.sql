-- Migration: expiry of credit buckets and of reservations past their TTL.
--
-- Purpose: tokens never vanish silently. When a bucket's expiry passes, expire_tokens() writes
-- an expiry entry for its remainder (keyed expiry:<bucket id>, so it happens once); until then
-- the tokens stay in the balance and remain spendable. Pending reservations past their TTL are
-- released with status expired. With pg_cron installed (it is on Supabase) it runs every minute.
-- Objects: public.expire_tokens(), the pg_cron job token-billing-expire (when pg_cron exists).

create function public.expire_tokens(
  p_as_of timestamptz default now()
) returns table (expired_buckets bigint, expired_reservations bigint)
language plpgsql
-- Definer: run by pg_cron as the owner and by service_role, which cannot write billing tables.
security definer
set search_path = ''
as $$
declare
  v_reservations bigint;
  v_buckets bigint := 0;
  v_user_id uuid;
  v_bucket record;
  v_balance bigint;
begin
  if p_as_of is null then
    raise exception using errcode = '22023', message = 'p_as_of must not be null';
  end if;

  -- One run at a time: concurrent runs would lock the same accounts in different orders.
  perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('token-billing:expire_tokens'));

  -- Reservations: resolve each (its row lock), then lift the holds from the accounts.
  with expired as (
    update billing.reservations as r
    set status = 'expired', resolved_at = now()
    where r.status = 'pending' and r.expires_at <= p_as_of
    returning r.user_id, r.amount
  ),

  per_user as (
    select e.user_id, sum(e.amount)::bigint as total
    from expired as e
    group by e.user_id
  ),

  lifted as (
    update billing.accounts as a
    set reserved = a.reserved - per_user.total, updated_at = now()
    from per_user
    where a.user_id = per_user.user_id
    returning a.user_id
  )

  select count(*) into v_reservations from expired;

  -- Buckets: per user in id order, lock the account, then empty its expired buckets.
  for v_user_id in
    select distinct b.user_id
    from billing.credit_buckets as b
    where b.remaining > 0 and b.expires_at <= p_as_of
    order by b.user_id
  loop
    -- Lock the account and draw its undrawn debits first: they came out of these buckets.
    perform billing.draw_buckets(v_user_id);

    for v_bucket in
      with due as (
        select b.id, b.remaining
        from billing.credit_buckets as b
        where b.user_id = v_user_id and b.remaining > 0 and b.expires_at <= p_as_of
        for update
      )

      update billing.credit_buckets as b
      set remaining = 0, expired_at = now()
      from due
      where b.id = due.id
      returning b.id, due.remaining
    loop
      update billing.accounts as a
      set balance = a.balance - v_bucket.remaining, updated_at = now()
      where a.user_id = v_user_id
      returning a.balance into v_balance;

      insert into billing.ledger_entries (
        user_id, amount, balance_after, kind, idempotency_key, description, metadata
      )
      values (
        v_user_id, -v_bucket.remaining, v_balance, 'expiry', 'expiry:' || v_bucket.id::text,
        'Tokens expired', jsonb_build_object('bucket_id', v_bucket.id)
      );
      v_buckets := v_buckets + 1;
    end loop;
  end loop;

  return query select v_buckets, v_reservations;
end;
$$;

comment on function public.expire_tokens(timestamptz) is
'Writes an expiry entry for the remainder of every bucket expired at p_as_of and expires '
'pending reservations past their TTL. Idempotent; returns how many of each it expired.';

revoke all on function public.expire_tokens(timestamptz) from public, anon, authenticated;
grant execute on function public.expire_tokens(timestamptz) to service_role;

-- pg_cron is optional: schedule the job only where the extension is installed.
do $schedule$
begin
  if exists (select 1 from pg_catalog.pg_extension where extname = 'pg_cron') then
    perform cron.schedule(
      'token-billing-expire', '* * * * *', 'select * from public.expire_tokens()'
    );
  end if;
end
$schedule$;

insert into billing.schema_migrations (version, name) values ('20261121000700', 'expiry');
