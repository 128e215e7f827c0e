-- One settled reservation per spread user (1..10000 of fixtures.sql), so billing.reservations
-- starts with rows and its planner statistics say so, as in a live database. The main bench
-- database only (the scaling databases measure deduct_tokens). Run as superuser.

select count(*) from (
  select public.settle_reservation(r.reservation_id, 1)
  from generate_series(1, 10000) as n,
    lateral public.reserve_tokens(
      lpad(to_hex(n), 32, '0')::uuid, 1, 'bench-hold-' || n
    ) as r
) as settled;

analyze billing.reservations;
