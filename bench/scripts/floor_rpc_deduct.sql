-- The floor's statement inside a security definer plpgsql function (reference/floor.sql) on
-- accounts :first..:last.
\set uid random(:first, :last)
select * from bench_floor.deduct(lpad(to_hex(:uid::integer), 32, '0')::uuid, 1);
