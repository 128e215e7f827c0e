-- public.handle_stripe_event with real fixture payloads made into fresh deliveries
-- (bench/sql/stripe_fixtures.sql: 40% pack checkouts, 20% subscription updates, 20% cycle
-- invoices, 20% event types stored as ignored), for users kept apart from the deduct workloads.
\set slot random(1, 10)
\set uid random(20001, 30000)
select * from public.handle_stripe_event(bench_stripe.instance(:slot::integer, :uid::integer));
