-- public.deduct_tokens, one hot account.
\set uid 10001
select * from public.deduct_tokens(lpad(to_hex(:uid::integer), 32, '0')::uuid, 1, gen_random_uuid()::text);
