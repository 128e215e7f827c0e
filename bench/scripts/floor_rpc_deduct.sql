-- The floor's statement inside a security definer plpgsql function, 10,000 accounts.
\set uid random(1, 10000)
select * from bench_floor.deduct(lpad(to_hex(:uid::integer), 32, '0')::uuid, 1);
